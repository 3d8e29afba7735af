"""Per-key token buckets: requests/min and tokens/min, in Redis (atomic, cluster-wide), in shared
memory (every process of one node, :mod:`gazsi_cluster.auth.shared_limits`) or in-process.

A bucket holds up to ``capacity`` (the per-minute limit) and refills at ``capacity/60`` per second.
Requests take 1 before they run; a request's tokens are taken before it runs too (the input size
is known after tokenising) and the difference is settled afterwards with ``force`` (a refund when
the cache served part of it), so a large request cannot overdraw the bucket. The Redis script
reads Redis' own clock so replicas with skewed clocks still share one bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from gazsi_cluster.auth._redis import RedisHealth

__all__ = ["Decision", "LocalRateLimiter", "RateLimiter", "RedisRateLimiter", "bucket_step"]

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


def decide(allowed: bool, tokens: float, capacity: int, cost: int) -> Decision:
    """The :class:`Decision` for a bucket left at ``tokens`` (refill ``capacity`` per minute)."""
    per_s = capacity / 60.0
    need = max(cost, 1) - tokens
    return Decision(
        allowed=allowed, limit=capacity, remaining=max(0, math.floor(tokens)),
        reset_s=max(0.0, (capacity - tokens) / per_s),
        retry_after_s=0.0 if allowed else max(0.0, need / per_s),
    )


def bucket_step(
    tokens: float, ts: float, now: float, *, capacity: int, cost: int, force: bool
) -> tuple[bool, float]:
    """Refill a bucket last touched at ``ts`` up to ``now`` and try to take ``cost``; returns
    (allowed, tokens left). ``force`` always takes (down to ``-capacity``); ``cost=0`` only checks
    that the bucket is positive."""
    tokens = min(float(capacity), tokens + max(0.0, now - ts) * capacity / 60.0)
    if force:
        return True, max(-float(capacity), tokens - cost)
    if tokens >= cost and tokens > 0:
        return True, tokens - cost
    return False, tokens


class RateLimiter(Protocol):
    #: Who shares the buckets: "process", "node" or "cluster" (shown by ``/readyz``).
    scope: str

    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        """Take ``cost`` from ``bucket`` if it holds enough (``cost=0``: only check it is positive);
        ``force`` debits regardless (a settlement after the fact; negative ``cost`` refunds)."""
        ...


class LocalRateLimiter:
    """The same buckets inside one process (a single-process node without Redis)."""

    scope = "process"

    def __init__(self, *, max_buckets: int = 100_000) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_buckets

    def acquire_now(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        now = time.monotonic()
        tokens, ts = self._buckets.get(bucket, (float(capacity), now))
        allowed, tokens = bucket_step(tokens, ts, now, capacity=capacity, cost=cost, force=force)
        self._buckets[bucket] = (tokens, now)
        self._buckets.move_to_end(bucket)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return decide(allowed, tokens, capacity, cost)

    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        return self.acquire_now(bucket, capacity=capacity, cost=cost, force=force)


class RedisRateLimiter:
    """Buckets in Redis, one Lua call per decision; ``fallback`` (the node's shared buckets, or
    in-process ones) decides while Redis is down."""

    scope = "cluster"

    def __init__(
        self, redis: Any, health: RedisHealth, *, prefix: str = "gazsi:rl:", fallback: RateLimiter | None = None
    ) -> None:
        self.redis = redis
        self.health = health
        self.prefix = prefix
        self.fallback: RateLimiter = fallback if fallback is not None else LocalRateLimiter()
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
                return decide(bool(allowed), float(tokens), capacity, cost)
        return await self.fallback.acquire(bucket, capacity=capacity, cost=cost, force=force)
