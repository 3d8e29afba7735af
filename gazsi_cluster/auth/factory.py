"""Build the authorizer the settings ask for (called by every process that serves: the edge node
process, each of its HTTP workers, the gateway).

A node with several processes shares its limits through one shared-memory table::

    table = create_node_limits(settings)                     # the node process, once; owns it
    auth = build_authorizer(settings, limiter=table)         # the node process
    # each worker, given table.name (argv/env):
    auth = build_authorizer(settings, limiter=attach_node_limits(name))
    ...
    table.close()                                            # the node process, after its workers

With ``auth.redis_url`` set, Redis holds the cluster-wide buckets and budgets and the table is
their fallback while Redis is down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gazsi_cluster.auth import AllowAll, Authorizer
from gazsi_cluster.auth._redis import connect_redis
from gazsi_cluster.auth.authorizer import KeyAuthorizer
from gazsi_cluster.auth.limits import RateLimiter
from gazsi_cluster.auth.shared_limits import SharedBuckets
from gazsi_cluster.auth.store import KeyStore, store_fingerprint
from gazsi_cluster.config import Settings

__all__ = [
    "attach_node_limits",
    "authorizer_for",
    "build_authorizer",
    "build_key_admin_parts",
    "create_node_limits",
    "journal_dir",
    "open_store",
]


def open_store(database_url: str | None, data_dir: Path) -> KeyStore:
    """PostgreSQL when ``database_url`` is set, else SQLite at ``<data_dir>/keys.sqlite3``.

    The backends import the contract in :mod:`gazsi_cluster.auth.store`; choosing one lives here, above
    both, so the contract never imports its implementations.
    """
    if database_url:
        from gazsi_cluster.auth._postgres import PostgresKeyStore

        return PostgresKeyStore(database_url)
    from gazsi_cluster.auth._sqlite import SqliteKeyStore

    return SqliteKeyStore(Path(data_dir) / "keys.sqlite3")


def journal_dir(settings: Settings) -> Path | None:
    """Where usage journals of this key store live (None when journaling is off)."""
    auth = settings.auth
    if not auth.usage_journal:
        return None
    base = auth.usage_journal_dir or Path(settings.data_dir) / "usage-journal"
    # Per store: a journal is never replayed into a store it was not written for.
    return Path(base) / store_fingerprint(auth.database_url, settings.data_dir)


def create_node_limits(settings: Settings) -> SharedBuckets:
    """The node's shared limits table (call once, in the node process; ``close()`` unlinks it)."""
    return SharedBuckets.create(entries=settings.auth.node_limit_entries)


def attach_node_limits(name: str) -> SharedBuckets:
    """The node's table in a worker process (by the name the node process passed down)."""
    return SharedBuckets.attach(name)


def build_authorizer(settings: Settings, *, limiter: RateLimiter | None = None) -> KeyAuthorizer:
    """A :class:`KeyAuthorizer` over PostgreSQL or embedded SQLite, with Redis when configured.

    ``limiter``: the node's :class:`SharedBuckets` when the node runs several processes (None = this
    process's own buckets). Nothing connects here; ``await authorizer.start()`` connects, migrates,
    opens the usage journal and starts the change-feed poller.
    """
    auth = settings.auth
    redis = connect_redis(auth.redis_url, timeout_s=auth.redis_timeout_s) if auth.redis_url else None
    return KeyAuthorizer(open_store(auth.database_url, settings.data_dir), auth, redis=redis, limiter=limiter,
                         journal_dir=journal_dir(settings))


def authorizer_for(settings: Settings, *, limiter: RateLimiter | None = None) -> Authorizer:
    """The key-store authorizer when auth is on; allow-all only when the operator turned auth off."""
    if not settings.auth.enabled:
        return AllowAll()
    return build_authorizer(settings, limiter=limiter)


def build_key_admin_parts(settings: Settings) -> tuple[Any, Any]:
    """(store, redis-or-None) for tools that manage keys without serving (the CLI)."""
    auth = settings.auth
    redis = connect_redis(auth.redis_url, timeout_s=auth.redis_timeout_s) if auth.redis_url else None
    return open_store(auth.database_url, settings.data_dir), redis
