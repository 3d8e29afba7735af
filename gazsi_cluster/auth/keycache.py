"""Verified-key caches: an in-process TTL LRU in front of a shared Redis tier.

Revocation is published on :data:`REVOCATION_CHANNEL`; every process's listener evicts its
copy, so a revoked key stops working everywhere within the pub/sub latency (milliseconds), and
at worst (Redis down) within the in-process TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from gazsi_cluster.auth._redis import RedisHealth
from gazsi_cluster.auth.keys import KeyRecord

__all__ = ["REVOCATION_CHANNEL", "LocalKeyCache", "RedisKeyTier", "publish_revocation"]

log = logging.getLogger(__name__)

REVOCATION_CHANNEL = "gazsi:auth:revocations"
_KEY_PREFIX = "gazsi:key:"


class LocalKeyCache:
    """TTL + LRU map from key hash to record. Not thread-safe: one per event loop."""

    def __init__(self, *, ttl_s: float, max_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_size, self.clock = ttl_s, max_size, clock
        self._items: OrderedDict[str, tuple[float, KeyRecord]] = OrderedDict()
        # Hashes revoked recently: a lookup that started before the revocation must not re-cache them.
        self._tombstones: dict[str, float] = {}

    def get(self, key_hash: str) -> KeyRecord | None:
        item = self._items.get(key_hash)
        if item is None:
            return None
        if item[0] <= self.clock():
            del self._items[key_hash]
            return None
        self._items.move_to_end(key_hash)
        return item[1]

    def put(self, record: KeyRecord) -> None:
        if self.ttl_s <= 0:
            return
        now = self.clock()
        until = self._tombstones.get(record.key_hash)
        if until is not None:
            if until > now and record.revoked_at is None:
                return
            del self._tombstones[record.key_hash]
        self._items[record.key_hash] = (now + self.ttl_s, record)
        self._items.move_to_end(record.key_hash)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def evict(self, key_hash: str) -> None:
        self._items.pop(key_hash, None)
        now = self.clock()
        self._tombstones[key_hash] = now + self.ttl_s
        if len(self._tombstones) > self.max_size:
            self._tombstones = {h: t for h, t in self._tombstones.items() if t > now}

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class RedisKeyTier:
    """Records as JSON under ``gazsi:key:<hash>``; readers fill with SET NX so they never overwrite
    the revoked copy a revoker wrote (a lookup racing a revocation cannot resurrect the key)."""

    def __init__(self, redis: Any, health: RedisHealth, *, ttl_s: float) -> None:
        self.redis, self.health, self.ttl_s = redis, health, ttl_s

    async def get(self, key_hash: str) -> KeyRecord | None:
        from redis.exceptions import RedisError

        if not self.health.usable():
            return None
        try:
            raw = await self.redis.get(_KEY_PREFIX + key_hash)
        except (RedisError, OSError) as exc:
            self.health.failed(exc)
            return None
        self.health.ok()
        return KeyRecord.from_cache(orjson.loads(raw)) if raw else None

    async def fill(self, record: KeyRecord) -> None:
        from redis.exceptions import RedisError

        if not self.health.usable():
            return
        try:
            await self.redis.set(_KEY_PREFIX + record.key_hash, orjson.dumps(record.to_cache()),
                                 ex=max(1, int(self.ttl_s)), nx=True)
        except (RedisError, OSError) as exc:
            self.health.failed(exc)

    async def listen(self, on_revoked: Callable[[str], None], ready: asyncio.Event | None = None) -> None:
        """Evict revoked hashes until cancelled; reconnects (and clears nothing) after Redis errors."""
        from redis.exceptions import RedisError

        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL)
                if ready is not None:
                    ready.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        data = message["data"]
                        on_revoked(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py can turn a cancellation mid-connect into ConnectionError; honour the cancel.
                    raise asyncio.CancelledError from exc
                self.health.failed(exc)
                log.warning("revocation listener lost Redis (%s); retrying", type(exc).__name__)
                await asyncio.sleep(self.health.cooldown_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


async def publish_revocation(redis: Any, record: KeyRecord, *, ttl_s: float) -> None:
    """Overwrite the shared copy with the revoked record, then tell every process to evict."""
    await redis.set(_KEY_PREFIX + record.key_hash, orjson.dumps(record.to_cache()), ex=max(1, int(ttl_s)))
    await redis.publish(REVOCATION_CHANNEL, record.key_hash)
