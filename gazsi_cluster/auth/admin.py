"""Key lifecycle shared by ``gazsi keys`` and ``/admin/keys``: create, list, show, update, revoke,
rotate, usage.

Every change is logged in the store's change feed (``key_events``) in the same transaction, which
every running process polls; with Redis it is also published, so processes apply it at once.
Usage reads through the usage journals not yet applied, so it matches what was served.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

from gazsi_cluster.auth.keycache import publish_change
from gazsi_cluster.auth.keys import (
    ADMIN_SCOPE,
    KeyRecord,
    NewKey,
    UsageRow,
    display_prefix,
    generate_key,
    hash_key,
)
from gazsi_cluster.auth.store import UPDATABLE, JournalSegment, KeyStore, merge_rows, new_segments
from gazsi_cluster.auth.usage_journal import read_journals
from gazsi_cluster.errors import InvalidRequest, NotFound

__all__ = ["KeyAdmin"]

log = logging.getLogger(__name__)

_LIMITS = ("rpm", "tpm", "monthly_quota", "daily_quota")


def _check_limits(values: Mapping[str, Any]) -> None:
    for name in _LIMITS:
        value = values.get(name)
        if value is not None and value < 1:
            raise InvalidRequest(f"{name} must be at least 1", param=name)


def _scopes(scopes: Sequence[str], admin: bool) -> tuple[str, ...]:
    scope_set = [s.strip() for s in scopes if s.strip()] or ["*"]
    if admin and ADMIN_SCOPE not in scope_set:
        scope_set.append(ADMIN_SCOPE)
    return tuple(dict.fromkeys(scope_set))


class KeyAdmin:
    """Thin layer over a :class:`KeyStore` that also tells every process about changes.

    ``on_change(kind, key_hash, record)`` applies a change in this process at once (the
    authorizer's caches); ``journal_dir`` is where usage journals live, for read-through usage.
    """

    def __init__(
        self, store: KeyStore, *, env: str, redis: Any | None = None, redis_ttl_s: float = 300.0,
        on_change: Callable[[str, str, KeyRecord | None], None] | None = None,
        clock: Callable[[], float] = time.time, journal_dir: Path | None = None,
    ) -> None:
        self.store, self.env, self.redis, self.redis_ttl_s = store, env, redis, redis_ttl_s
        self.on_change = on_change
        self.clock = clock
        self.journal_dir = journal_dir

    async def create(
        self, *, name: str, owner: str = "", scopes: Sequence[str] = ("*",), rpm: int | None = None,
        tpm: int | None = None, monthly_quota: int | None = None, daily_quota: int | None = None,
        expires_days: float | None = None, expires_in_s: float | None = None, admin: bool = False,
    ) -> NewKey:
        """A new key; ``NewKey.key`` is the only time the secret exists outside the caller's hands."""
        if not name.strip():
            raise InvalidRequest("name must not be empty", param="name")
        _check_limits({"rpm": rpm, "tpm": tpm, "monthly_quota": monthly_quota, "daily_quota": daily_quota})
        if expires_days is not None:
            if expires_in_s is not None:
                raise InvalidRequest("give expires_in or expires_days, not both", param="expires_in")
            expires_in_s = expires_days * 86_400.0
        if expires_in_s is not None and expires_in_s <= 0:
            raise InvalidRequest("the expiry must be in the future", param="expires_in")
        now = self.clock()
        key = generate_key(self.env)
        record = KeyRecord(
            id=f"key_{secrets.token_hex(8)}", name=name.strip(), owner=owner, prefix=display_prefix(key),
            key_hash=hash_key(key), scopes=_scopes(scopes, admin), created_at=now,
            expires_at=None if expires_in_s is None else now + expires_in_s,
            rpm=rpm, tpm=tpm, monthly_quota=monthly_quota, daily_quota=daily_quota,
        )
        await self.store.insert(record)
        log.info("created key %s (%s)", record.id, record.prefix)
        return NewKey(record, key)

    async def ensure_key(self, key: str, *, name: str, admin: bool = True) -> KeyRecord:
        """Store a key given from outside (a bootstrap admin key from a Secret) unless it exists."""
        existing = await self.store.get_by_hash(hash_key(key))
        if existing is not None:
            return existing
        record = KeyRecord(
            id=f"key_{secrets.token_hex(8)}", name=name, prefix=display_prefix(key), key_hash=hash_key(key),
            scopes=("*", ADMIN_SCOPE) if admin else ("*",), created_at=self.clock(),
        )
        await self.store.insert(record)
        return record

    async def list_keys(self) -> list[KeyRecord]:
        return await self.store.list_keys()

    async def get(self, ident: str) -> KeyRecord:
        record = await self.store.find(ident)
        if record is None:
            raise NotFound(f"no key with id or prefix {ident!r}", param="key")
        return record

    async def revoke(self, ident: str) -> KeyRecord:
        record = await self.get(ident)
        revoked = await self.store.revoke(record.id, self.clock())
        assert revoked is not None
        await self._announce("revoke", revoked.key_hash, revoked)
        return revoked

    async def rotate(self, ident: str) -> NewKey:
        """A new secret for the same key: same id, so usage, limit windows and budgets carry over;
        the old secret stops working at once (everywhere within the change-feed poll)."""
        old = await self.get(ident)
        if old.revoked_at is not None:
            raise InvalidRequest(f"key {old.prefix}… is revoked; create a new one", param="key")
        key = generate_key(self.env)
        fresh = await self.store.rotate(old.id, key_hash=hash_key(key), prefix=display_prefix(key),
                                        at=self.clock())
        assert fresh is not None
        # The old hash's shared copy becomes a revoked tombstone: no reader refills the old secret.
        await self._announce("rotate", old.key_hash, replace(old, revoked_at=self.clock()))
        log.info("rotated key %s (%s… -> %s…)", old.id, old.prefix, fresh.prefix)
        return NewKey(fresh, key)

    async def update(self, ident: str, *, admin: bool | None = None, expires_in_s: float | None = None,
                     clear_expiry: bool = False, **changes: Any) -> KeyRecord:
        """Change limits, budgets, models, name, owner or expiry (``None`` values are left alone;
        pass 0 for a limit to remove it)."""
        record = await self.get(ident)
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise InvalidRequest(f"cannot update {sorted(unknown)}", param=sorted(unknown)[0])
        wanted = {k: v for k, v in changes.items() if v is not None}
        for name in _LIMITS:
            if wanted.get(name) == 0:
                wanted[name] = None  # 0 removes the limit
            elif name in wanted:
                _check_limits({name: wanted[name]})
        if "scopes" in wanted or admin is not None:
            scopes = wanted.get("scopes", record.models)
            is_admin = record.is_admin() if admin is None else admin
            wanted["scopes"] = _scopes(scopes, is_admin)
        if expires_in_s is not None:
            if expires_in_s <= 0:
                raise InvalidRequest("the expiry must be in the future", param="expires_in")
            wanted["expires_at"] = self.clock() + expires_in_s
        elif clear_expiry:
            wanted["expires_at"] = None
        updated = await self.store.update(record.id, wanted, self.clock())
        assert updated is not None
        await self._announce("update", updated.key_hash, updated)
        return updated

    async def usage(
        self, *, ident: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        """Usage per (key, model, day): the store's rows plus journal lines not applied yet, read
        against one snapshot of the store so nothing is counted twice."""
        key_id = (await self.get(ident)).id if ident else None
        if self.journal_dir is None:
            return await self.store.usage(key_id=key_id, since=since, until=until)
        segments = read_journals(self.journal_dir)
        rows, marks = await self.store.usage_with_marks(
            sorted({s.writer for s in segments}), key_id=key_id, since=since, until=until)
        extra = [r for r in merge_rows(new_segments(segments, marks))
                 if (key_id is None or r.key_id == key_id) and (since is None or r.day >= since)
                 and (until is None or r.day <= until)]
        if not extra:
            return rows
        both = [JournalSegment("", 0, tuple(rows)), JournalSegment("", 0, tuple(extra))]
        return sorted(merge_rows(both), key=lambda r: (r.day, r.key_id, r.model))

    async def _announce(self, kind: str, key_hash: str, record: KeyRecord) -> None:
        if self.on_change is not None:
            self.on_change(kind, key_hash, record)
        if self.redis is not None:
            from redis.exceptions import RedisError

            try:
                await publish_change(self.redis, kind, key_hash, record, ttl_s=self.redis_ttl_s)
            except (RedisError, OSError) as exc:
                # The store's change feed still carries it: every process polls it.
                log.warning("could not publish the %s of %s: %s", kind, record.id, type(exc).__name__)

