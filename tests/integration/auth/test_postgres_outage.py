"""PostgreSQL going away under a running authorizer: cached keys keep working, new ones get 503."""

from __future__ import annotations

from pathlib import Path

import pytest

from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import ServiceUnavailable
from tests.support.required import unavailable
from tests.support.services import ThrowawayPostgres

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_database_down_cached_keys_live_until_ttl_uncached_get_503(tmp_path: Path) -> None:
    pg = ThrowawayPostgres(tmp_path / "pg")
    try:
        pg.start()
    except Exception as exc:
        unavailable(f"PostgreSQL unavailable: {exc!r}")
    settings = load_settings(data_dir=str(tmp_path), auth={"database_url": pg.url, "key_env": "test"})
    auth = build_authorizer(settings)
    await auth.start()
    try:
        cached = await auth.admin.create(name="cached")
        uncached = await auth.admin.create(name="uncached")
        await auth.authorize(f"Bearer {cached.key}")
        pg.stop()  # the real server goes away
        assert (await auth.authorize(f"Bearer {cached.key}")).key_id == cached.record.id
        with pytest.raises(ServiceUnavailable):
            await auth.authorize(f"Bearer {uncached.key}")
        assert auth.status()["database"] == "degraded"
        assert auth.metrics.degraded.labels("database")._value.get() == 1
    finally:
        await auth.close()
        pg.stop()
