"""Key lifecycle shared by ``gazsi keys`` and ``/admin/keys``: create, list, show, revoke, rotate, usage."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import date
from typing import Any

from gazsi_cluster.auth.keycache import publish_revocation
from gazsi_cluster.auth.keys import (
    ADMIN_SCOPE,
    KeyRecord,
    NewKey,
    UsageRow,
    display_prefix,
    generate_key,
    hash_key,
)
from gazsi_cluster.auth.store import KeyStore
from gazsi_cluster.errors import InvalidRequest, NotFound

__all__ = ["KeyAdmin"]

log = logging.getLogger(__name__)


class KeyAdmin:
    """Thin layer over a :class:`KeyStore` that also tells every process about revocations."""

    def __init__(
        self, store: KeyStore, *, env: str, redis: Any | None = None, redis_ttl_s: float = 300.0,
        on_revoked: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.env, self.redis, self.redis_ttl_s = store, env, redis, redis_ttl_s
        self.on_revoked = on_revoked
        self.clock = clock

    async def create(
        self, *, name: str, owner: str = "", scopes: Sequence[str] = ("*",), rpm: int | None = None,
        tpm: int | None = None, monthly_quota: int | None = None, expires_days: float | None = None,
        admin: bool = False,
    ) -> NewKey:
        """A new key; ``NewKey.key`` is the only time the secret exists outside the caller's hands."""
        if not name.strip():
            raise InvalidRequest("name must not be empty", param="name")
        for field_name, value in (("rpm", rpm), ("tpm", tpm), ("monthly_quota", monthly_quota)):
            if value is not None and value < 1:
                raise InvalidRequest(f"{field_name} must be at least 1", param=field_name)
        if expires_days is not None and expires_days <= 0:
            raise InvalidRequest("expires_days must be positive", param="expires_days")
        scope_set = [s.strip() for s in scopes if s.strip()] or ["*"]
        if admin and ADMIN_SCOPE not in scope_set:
            scope_set.append(ADMIN_SCOPE)
        now = self.clock()
        key = generate_key(self.env)
        record = KeyRecord(
            id=f"key_{secrets.token_hex(8)}", name=name.strip(), owner=owner, prefix=display_prefix(key),
            key_hash=hash_key(key), scopes=tuple(dict.fromkeys(scope_set)), created_at=now,
            expires_at=None if expires_days is None else now + expires_days * 86_400.0,
            rpm=rpm, tpm=tpm, monthly_quota=monthly_quota,
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
        await self._announce(revoked)
        return revoked

    async def rotate(self, ident: str) -> NewKey:
        """A new secret with the same name, scopes and limits; the old key is revoked at once."""
        old = await self.get(ident)
        key = generate_key(self.env)
        fresh = replace(
            old, id=f"key_{secrets.token_hex(8)}", prefix=display_prefix(key), key_hash=hash_key(key),
            created_at=self.clock(), revoked_at=None,
        )
        await self.store.insert(fresh)
        await self.revoke(old.id)
        return NewKey(fresh, key)

    async def usage(
        self, *, ident: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        key_id = (await self.get(ident)).id if ident else None
        return await self.store.usage(key_id=key_id, since=since, until=until)

    async def _announce(self, record: KeyRecord) -> None:
        if self.on_revoked is not None:
            self.on_revoked(record.key_hash)
        if self.redis is not None:
            from redis.exceptions import RedisError

            try:
                await publish_revocation(self.redis, record, ttl_s=self.redis_ttl_s)
            except (RedisError, OSError) as exc:
                # The database already says revoked; other processes converge within their cache TTL.
                log.warning("could not publish revocation of %s: %s", record.id, type(exc).__name__)
