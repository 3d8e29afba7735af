"""The auth and cache packages' public surfaces are pinned."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_auth_exports() -> None:
    import gazsi_cluster.auth as auth

    assert set(auth.__all__) == {"AllowAll", "Authorizer", "Principal"}


def test_cache_exports() -> None:
    import gazsi_cluster.cache as cache

    assert set(cache.__all__) == {"CacheBackend", "CacheResult", "LocalLRUBackend", "RedisBackend",
                                  "ResponseCache", "build_response_cache", "item_key"}
    for name in cache.__all__:
        assert hasattr(cache, name)
