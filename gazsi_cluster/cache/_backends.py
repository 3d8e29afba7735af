"""Where cached embeddings live: an in-process LRU or Redis. Both fail open (a miss), never closed."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

from gazsi_cluster.auth._redis import RedisHealth

__all__ = ["CacheBackend", "LocalLRUBackend", "RedisBackend"]

log = logging.getLogger(__name__)


class CacheBackend(Protocol):
    name: str

    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    async def set_many(self, items: dict[str, bytes], ttl_s: int) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class LocalLRUBackend:
    name = "memory"

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        for key in keys:
            item = self._items.get(key)
            if item is None or item[0] <= now:
                if item is not None:
                    del self._items[key]
                out.append(None)
            else:
                self._items.move_to_end(key)
                out.append(item[1])
        return out

    async def set_many(self, items: dict[str, bytes], ttl_s: int) -> None:
        until = time.monotonic() + ttl_s
        for key, value in items.items():
            self._items[key] = (until, value)
            self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    async def close(self) -> None:
        self._items.clear()

    def status(self) -> dict[str, Any]:
        return {"backend": self.name, "items": len(self._items)}

    def __len__(self) -> int:
        return len(self._items)


class RedisBackend:
    """Shared tier: MGET for lookups, one pipelined SET EX per batch of fills. Size is bounded by
    the TTL and Redis' own ``maxmemory`` policy (set ``allkeys-lru`` on a dedicated cache Redis)."""

    name = "redis"

    def __init__(self, redis: Any, *, prefix: str = "gazsi:emb:") -> None:
        self.redis = redis
        self.prefix = prefix
        self.health = RedisHealth()

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        from redis.exceptions import RedisError

        if not keys or not self.health.usable():
            return [None] * len(keys)
        try:
            values: list[bytes | None] = await self.redis.mget([self.prefix + k for k in keys])
        except (RedisError, OSError) as exc:
            self.health.failed(exc)
            return [None] * len(keys)
        self.health.ok()
        return values

    async def set_many(self, items: dict[str, bytes], ttl_s: int) -> None:
        from redis.exceptions import RedisError

        if not items or not self.health.usable():
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(self.prefix + key, value, ex=ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.health.failed(exc)

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        except Exception:  # closing a dead connection must not mask shutdown
            log.debug("redis close failed", exc_info=True)

    def status(self) -> dict[str, Any]:
        return {"backend": self.name, "redis": "degraded" if self.health.degraded else "ok"}
