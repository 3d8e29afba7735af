"""Per-key limits: token buckets (requests/min, tokens/min) and budget counters (tokens per day or
month), held in Redis (atomic, cluster-wide), in the node's shared-memory table (every process of
one node, :mod:`gazsi_cluster.auth.shared_limits`) or in-process.

A request's limits are one list of :class:`Op` applied all-or-nothing in one step: one Lua call
(one Redis round trip), one pass under the table's locks, or one pass over dicts. If any op does
not fit, nothing is taken, so a request refused for its budget costs it no request slot.

A bucket holds up to ``limit`` (per minute) and refills at ``limit/60`` per second; an op takes
``cost`` if the bucket holds that much and is positive (``cost=0`` only checks it is positive).
A counter holds what was used in its period; an op adds ``cost`` if ``used + max(cost, 1) <=
limit`` (``cost=0`` checks one token is left). ``force`` always applies (a settlement after the
fact; a negative cost refunds); buckets never go below ``-limit``. An absent counter starts at the
op's ``seed``; without one the outcome names it (``unseeded``) and nothing is applied, so the
caller can read the period's total from the key store and try again. The Redis script reads
Redis' own clock, so replicas with skewed clocks share one bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gazsi_cluster.auth._redis import RedisHealth

__all__ = [
    "Decision",
    "LocalRateLimiter",
    "Op",
    "Outcome",
    "RateLimiter",
    "RedisRateLimiter",
    "bucket_step",
    "counter_step",
    "decide",
    "limit_name",
]

_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local old, new, seeded = {}, {}, {}
local refused, unseeded = -1, -1
for i = 1, n do
  local b = (i - 1) * 6
  local counter = ARGV[b + 1] == '1'
  local limit = tonumber(ARGV[b + 2])
  local cost = tonumber(ARGV[b + 3])
  local force = ARGV[b + 4] == '1'
  local v
  if counter then
    v = tonumber(redis.call('GET', KEYS[i]))
    if v == nil then
      if ARGV[b + 5] == '' then
        if unseeded < 0 then unseeded = i - 1 end
        v = 0
      else
        v = tonumber(ARGV[b + 5]); seeded[i] = true
      end
    end
    old[i] = v
    if force or v + math.max(cost, 1) <= limit then new[i] = v + cost
    else new[i] = v; if refused < 0 then refused = i - 1 end end
  else
    local data = redis.call('HMGET', KEYS[i], 't', 'ts')
    local tokens, ts = tonumber(data[1]), tonumber(data[2])
    if tokens == nil or ts == nil then tokens = limit; ts = now end
    v = math.min(limit, tokens + math.max(0, now - ts) * limit / 60000)
    old[i] = v
    if force then new[i] = math.max(-limit, v - cost)
    elseif v >= cost and v > 0 then new[i] = v - cost
    else new[i] = v; if refused < 0 then refused = i - 1 end end
  end
end
local ok = refused < 0 and unseeded < 0
local out = {}
for i = 1, n do
  local b = (i - 1) * 6
  local limit = tonumber(ARGV[b + 2])
  if ok then
    if ARGV[b + 1] == '1' then
      if new[i] ~= old[i] or seeded[i] then redis.call('SET', KEYS[i], tostring(new[i]), 'EX', ARGV[b + 6]) end
    else
      redis.call('HSET', KEYS[i], 't', tostring(new[i]), 'ts', tostring(now))
      redis.call('PEXPIRE', KEYS[i], 61000)
    end
    out[i] = tostring(new[i])
  else
    out[i] = tostring(old[i])
  end
end
return {ok and 1 or 0, refused, unseeded, out}
"""


def limit_name(key_id: str, what: str) -> str:
    """The name of a key's limit: ``{key_id}:rpm``, ``{key_id}:tpm``, ``{key_id}:d20261201`` (daily
    budget), ``{key_id}:m202612``. The braces are a Redis Cluster hash tag: one key's limits live in
    one slot, so the one Lua call per request step stays legal there."""
    return f"{{{key_id}}}:{what}"


@dataclass(frozen=True, slots=True)
class Op:
    """One limit to charge: a bucket (per-minute ``limit``) or, with ``counter``, a budget."""

    name: str
    limit: int
    cost: int = 0
    force: bool = False
    counter: bool = False
    seed: int | None = None  # counters: the value to start from when absent
    ttl_s: int = 86_400  # counters: how long an untouched counter lives


@dataclass(frozen=True, slots=True)
class Outcome:
    """``ok``: every op applied. Else ``refused`` / ``unseeded`` is the index of the op that did
    not fit / the absent counter without a seed (-1 when none) and nothing was applied. ``values``:
    per op, tokens left in the bucket or the counter's value (after, or as found when not ok)."""

    ok: bool
    refused: int
    unseeded: int
    values: tuple[float, ...]


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
) -> tuple[bool, float, float]:
    """Refill a bucket last touched at ``ts`` up to ``now`` and try to take ``cost``; returns
    (allowed, tokens before, tokens after)."""
    tokens = min(float(capacity), tokens + max(0.0, now - ts) * capacity / 60.0)
    if force:
        return True, tokens, max(-float(capacity), tokens - cost)
    if tokens >= cost and tokens > 0:
        return True, tokens, tokens - cost
    return False, tokens, tokens


def counter_step(used: float, *, limit: int, cost: int, force: bool) -> tuple[bool, float]:
    """(allowed, value after) for a budget counter at ``used``."""
    if force or used + max(cost, 1) <= limit:
        return True, used + cost
    return False, used


def outcome_of(ops: Sequence[Op], steps: Sequence[tuple[bool, float, float] | None]) -> Outcome:
    """Fold per-op steps ((allowed, before, after), or None for an unseeded counter)."""
    refused = next((i for i, s in enumerate(steps) if s is not None and not s[0]), -1)
    unseeded = next((i for i, s in enumerate(steps) if s is None), -1)
    ok = refused < 0 and unseeded < 0
    values = tuple(0.0 if s is None else (s[2] if ok else s[1]) for s in steps)
    return Outcome(ok, refused, unseeded, values)


class RateLimiter(Protocol):
    #: Who shares the limits: "process", "node" or "cluster" (shown by ``/readyz``).
    scope: str

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        """Apply every op or none (see the module docstring)."""
        ...

    async def lift(self, name: str, value: int, *, ttl_s: int = 86_400) -> None:
        """Raise a counter to at least ``value`` (create it if absent); never lowers it."""
        ...

    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        """One bucket op as a :class:`Decision` (for X-RateLimit headers)."""
        ...


class _Single:
    """``acquire`` in terms of ``apply``."""

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        raise NotImplementedError

    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        out = await self.apply([Op(bucket, capacity, cost, force)])
        return decide(out.ok, out.values[0], capacity, cost)


class LocalRateLimiter(_Single):
    """The same limits inside one process. ``scope="node"`` when that process is the whole node
    (a single-process edge), so ``/readyz`` says so."""

    def __init__(self, *, max_items: int = 100_000, scope: str = "process") -> None:
        self.scope = scope
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._counters: OrderedDict[str, float] = OrderedDict()
        self._max = max_items

    def apply_now(self, ops: Sequence[Op]) -> Outcome:
        now = time.monotonic()
        steps: list[tuple[bool, float, float] | None] = []
        for op in ops:
            if op.counter:
                used = self._counters.get(op.name, op.seed)
                if used is None:
                    steps.append(None)
                    continue
                allowed, after = counter_step(used, limit=op.limit, cost=op.cost, force=op.force)
                steps.append((allowed, used, after))
            else:
                tokens, ts = self._buckets.get(op.name, (float(op.limit), now))
                steps.append(bucket_step(tokens, ts, now, capacity=op.limit, cost=op.cost, force=op.force))
        out = outcome_of(ops, steps)
        if out.ok:
            for op, value in zip(ops, out.values, strict=True):
                store: OrderedDict[str, Any] = self._counters if op.counter else self._buckets
                store[op.name] = value if op.counter else (value, now)
                store.move_to_end(op.name)
                if len(store) > self._max:
                    store.popitem(last=False)  # an evicted counter re-seeds from the store
        return out

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        return self.apply_now(ops)

    async def lift(self, name: str, value: int, *, ttl_s: int = 86_400) -> None:
        self._counters[name] = max(self._counters.get(name, value), value)


class RedisRateLimiter(_Single):
    """Limits in Redis, one Lua call per request step; ``fallback`` (the node's shared table, or
    in-process limits) decides while Redis is down."""

    scope = "cluster"

    def __init__(
        self, redis: Any, health: RedisHealth, *, prefix: str = "gazsi:rl:", fallback: RateLimiter | None = None
    ) -> None:
        self.redis = redis
        self.health = health
        self.prefix = prefix
        self.fallback: RateLimiter = fallback if fallback is not None else LocalRateLimiter()
        self._script = redis.register_script(_LUA)

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        from redis.exceptions import RedisError

        if self.health.usable():
            args: list[Any] = []
            for op in ops:
                args += [int(op.counter), op.limit, op.cost, int(op.force), "" if op.seed is None else op.seed,
                         max(1, op.ttl_s)]
            try:
                ok, refused, unseeded, values = await self._script(keys=[self.prefix + op.name for op in ops],
                                                                   args=args)
            except (RedisError, OSError) as exc:
                self.health.failed(exc)
            else:
                self.health.ok()
                return Outcome(bool(ok), int(refused), int(unseeded), tuple(float(v) for v in values))
        return await self.fallback.apply(ops)

    async def lift(self, name: str, value: int, *, ttl_s: int = 86_400) -> None:
        # Redis' counter is the cluster's truth already; only the fallback needs lifting.
        await self.fallback.lift(name, value, ttl_s=ttl_s)
