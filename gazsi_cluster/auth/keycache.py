"""Verified-key caches: an in-process TTL LRU in front of a shared Redis tier, and the feed of
key changes every process applies to them.

A change (revoke, rotate, update) is published on :data:`REVOCATION_CHANNEL` where Redis exists;
every process's listener evicts its copy within the pub/sub latency (milliseconds). Every
process also polls the key store's ``key_events`` table (:class:`KeyEventWatcher`, one indexed
range query every ``auth.key_events_poll_s``), so a change reaches every process within that
interval with no Redis at all, or when the publisher could not reach Redis.
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
from gazsi_cluster.auth.store import KeyEvent, KeyStore
from gazsi_cluster.errors import GazsiError

__all__ = [
    "REVOCATION_CHANNEL",
    "KeyEventWatcher",
    "LocalKeyCache",
    "RedisKeyTier",
    "parse_change",
    "publish_change",
    "publish_revocation",
]

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

    def evict(self, key_hash: str, *, tombstone: bool = True) -> None:
        """Drop ``key_hash``; with ``tombstone`` (revoked or rotated away) a lookup that started
        before the change cannot put a still-valid copy back for one TTL."""
        self._items.pop(key_hash, None)
        if not tombstone:
            return
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

    async def replace(self, key_hash: str, record: KeyRecord | None) -> None:
        """Overwrite (or, with None, delete) the shared copy: after a change, readers' SET NX fills
        must not keep serving the old record for the tier's TTL."""
        from redis.exceptions import RedisError

        if not self.health.usable():
            return
        try:
            if record is None:
                await self.redis.delete(_KEY_PREFIX + key_hash)
            else:
                await self.redis.set(_KEY_PREFIX + key_hash, orjson.dumps(record.to_cache()),
                                     ex=max(1, int(self.ttl_s)))
        except (RedisError, OSError) as exc:
            self.health.failed(exc)

    async def listen(self, on_revoked: Callable[[str], None], ready: asyncio.Event | None = None) -> None:
        """Pass each change message to ``on_revoked`` until cancelled; reconnects (and clears
        nothing) after Redis errors."""
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
    await publish_change(redis, "revoke", record.key_hash, record, ttl_s=ttl_s)


async def publish_change(redis: Any, kind: str, key_hash: str, record: KeyRecord | None, *, ttl_s: float) -> None:
    """Put ``record`` (the state after the change; for a rotation, the retired secret's tombstone)
    under ``key_hash`` in the shared tier, then tell every process: ``<kind>:<hash>``."""
    if record is not None:
        await redis.set(_KEY_PREFIX + key_hash, orjson.dumps(record.to_cache()), ex=max(1, int(ttl_s)))
    await redis.publish(REVOCATION_CHANNEL, f"{kind}:{key_hash}")


def parse_change(message: str) -> tuple[str, str]:
    """``(kind, key_hash)`` of a change message (a bare hash, as older publishers send, is a revocation)."""
    kind, sep, key_hash = message.partition(":")
    return (kind, key_hash) if sep else ("revoke", message)


class KeyEventWatcher:
    """Polls the store's change feed and hands each new event to ``apply``, in order.

    Starts from the newest event at start-up (an empty cache has nothing to evict). While the
    store is down it keeps trying; the changes are still in the table when it comes back.
    """

    def __init__(self, store: KeyStore, apply: Callable[[KeyEvent], Any], *, interval_s: float,
                 batch: int = 1000) -> None:
        self.store, self.apply, self.interval_s, self.batch = store, apply, interval_s, batch
        self.seq: int | None = None
        self.polls = 0

    async def poll_once(self) -> int:
        """Apply what is new; returns how many events were applied."""
        if self.seq is None:
            self.seq = await self.store.last_event_seq()
            return 0
        applied = 0
        while True:
            events = await self.store.events_since(self.seq, limit=self.batch)
            for event in events:
                result = self.apply(event)
                if asyncio.iscoroutine(result):
                    await result
                self.seq = event.seq
            applied += len(events)
            if len(events) < self.batch:
                return applied

    async def run(self, ready: asyncio.Event | None = None) -> None:
        while True:
            try:
                await self.poll_once()
            except GazsiError as exc:
                log.debug("key event poll failed: %s", exc)
            except Exception:
                # Never die quietly: a dead poller would let revoked keys live for the cache TTL.
                log.exception("key event poll failed unexpectedly; retrying")
            else:
                self.polls += 1
                if ready is not None and self.seq is not None:
                    ready.set()
            await asyncio.sleep(self.interval_s)
