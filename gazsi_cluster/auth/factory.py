"""Build the authorizer the settings ask for (called by ``gazsi edge serve`` and the gateway)."""

from __future__ import annotations

from typing import Any

from gazsi_cluster.auth import AllowAll, Authorizer
from gazsi_cluster.auth._redis import connect_redis
from gazsi_cluster.auth.authorizer import KeyAuthorizer
from gazsi_cluster.auth.store import open_store
from gazsi_cluster.config import Settings

__all__ = ["authorizer_for", "build_authorizer", "build_key_admin_parts"]


def build_authorizer(settings: Settings) -> KeyAuthorizer:
    """A :class:`KeyAuthorizer` over PostgreSQL or embedded SQLite, with Redis when configured.

    Nothing connects here; ``await authorizer.start()`` (the edge runtime does it) connects and
    migrates.
    """
    auth = settings.auth
    redis = connect_redis(auth.redis_url, timeout_s=auth.redis_timeout_s) if auth.redis_url else None
    return KeyAuthorizer(open_store(auth.database_url, settings.data_dir), auth, redis=redis)


def authorizer_for(settings: Settings) -> Authorizer:
    """The key-store authorizer when auth is on; allow-all only when the operator turned auth off."""
    if not settings.auth.enabled:
        return AllowAll()
    return build_authorizer(settings)


def build_key_admin_parts(settings: Settings) -> tuple[Any, Any]:
    """(store, redis-or-None) for tools that manage keys without serving (the CLI)."""
    auth = settings.auth
    redis = connect_redis(auth.redis_url, timeout_s=auth.redis_timeout_s) if auth.redis_url else None
    return open_store(auth.database_url, settings.data_dir), redis
