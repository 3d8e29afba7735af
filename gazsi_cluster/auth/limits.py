"""Per-key token buckets: requests/min and tokens/min, in Redis (atomic, cluster-wide) or in-process.

A bucket holds up to ``capacity`` (the per-minute limit) and refills at ``capacity/60`` per second.
Requests take 1 before they run; tokens are checked (bucket > 0) before and debited after the
response, when the count is known, so a big request may push the bucket negative and the key
waits until it refills. The Redis script reads Redis' own clock so replicas with skewed clocks
still share one bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from gazsi_cluster.auth._redis import RedisHealth

__all__ = ["Decision", "LocalRateLimiter", "RateLimiter", "RedisRateLimiter"]

_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local force = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local data = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(data[1])
local ts = tonumber(data[2])
if tokens == nil or ts == nil then tokens = capacity; ts = now end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if force == 1 then
  tokens = math.max(-capacity, tokens - cost); allowed = 1
elseif tokens >= cost and tokens > 0 then
  tokens = tokens - cost; allowed = 1
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate) + 1000)
return {allowed, tostring(tokens)}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # until this request would be allowed (0 when allowed)


def _decide(allowed: bool, tokens: float, capacity: int, per_s: float, cost: int) -> Decision:
    need = max(cost, 1) - tokens
    return Decision(
        allowed=allowed, limit=capacity, remaining=max(0, math.floor(tokens)),
        reset_s=max(0.0, (capacity - tokens) / per_s),
        retry_after_s=0.0 if allowed else max(0.0, need / per_s),
    )


class RateLimiter(Protocol):
    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        """Take ``cost`` from ``bucket`` if it holds enough (``cost=0``: only check it is positive);
        ``force`` debits regardless (used after the fact for tokens)."""


class LocalRateLimiter:
    """The same buckets inside one process (embedded mode, or Redis down)."""

    def __init__(self, *, max_buckets: int = 100_000) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_buckets

    def acquire_now(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        per_s = capacity / 60.0
        now = time.monotonic()
        tokens, ts = self._buckets.get(bucket, (float(capacity), now))
        tokens = min(float(capacity), tokens + (now - ts) * per_s)
        allowed = False
        if force:
            tokens, allowed = max(-float(capacity), tokens - cost), True
        elif tokens >= cost and tokens > 0:
            tokens, allowed = tokens - cost, True
        self._buckets[bucket] = (tokens, now)
        self._buckets.move_to_end(bucket)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return _decide(allowed, tokens, capacity, per_s, cost)

    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        return self.acquire_now(bucket, capacity=capacity, cost=cost, force=force)


class RedisRateLimiter:
    """Buckets in Redis, one Lua call per decision; falls back to in-process buckets while Redis is down."""

    def __init__(self, redis: Any, health: RedisHealth, *, prefix: str = "gazsi:rl:") -> None:
        self.redis = redis
        self.health = health
        self.prefix = prefix
        self.fallback = LocalRateLimiter()
        self._script = redis.register_script(_LUA)

    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        from redis.exceptions import RedisError

        if self.health.usable():
            try:
                allowed, tokens = await self._script(
                    keys=[self.prefix + bucket], args=[capacity, capacity / 60_000.0, cost, int(force)]
                )
            except (RedisError, OSError) as exc:
                self.health.failed(exc)
            else:
                self.health.ok()
                return _decide(bool(allowed), float(tokens), capacity, capacity / 60.0, cost)
        return self.fallback.acquire_now(bucket, capacity=capacity, cost=cost, force=force)
