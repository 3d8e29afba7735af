"""Token budgets per key and period (UTC day, calendar month): counters charged before the work.

A counter per (key, period) holds the tokens used so far. It is seeded once from the key store's
total for the period, then every process charges it atomically: a request's tokens are added
before it runs if they fit (else 429 ``insufficient_quota``), and the difference is settled when
it finishes. Where the counter lives decides who shares it: Redis (every process of the
cluster), the node's shared-memory table (every process of one node), or a dict (one process).
Without Redis, each process lifts the node's counter to the store's total now and then, so
usage that other nodes wrote becomes visible (never lowered: that would forget unflushed usage).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from gazsi_cluster.auth._redis import RedisHealth
from gazsi_cluster.auth.keys import KeyRecord, format_utc
from gazsi_cluster.auth.store import KeyStore
from gazsi_cluster.errors import QuotaExceeded

__all__ = ["Counters", "LocalCounters", "QuotaBook", "RedisCounters", "SharedCounters"]

_LUA = """
local v = redis.call('GET', KEYS[1])
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
if not v then
  if ARGV[4] == '' then return {-1, 0} end
  redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[5], 'NX')
  v = redis.call('GET', KEYS[1])
end
v = tonumber(v)
if ARGV[3] == '1' or v + cost <= limit then
  if cost ~= 0 then v = redis.call('INCRBY', KEYS[1], cost) end
  return {1, v}
end
return {0, v}
"""


class Counters(Protocol):
    scope: str

    async def charge(self, name: str, *, limit: int, cost: int, force: bool = False,
                     seed: int | None = None, ttl_s: int = 0) -> tuple[bool, int] | None:
        """Add ``cost`` if the counter stays within ``limit`` (always with ``force``); an absent
        counter starts at ``seed``, or the answer is None when no seed is given."""
        ...

    async def lift(self, name: str, value: int, *, ttl_s: int = 0) -> None:
        """Raise the counter to at least ``value`` (create it if absent)."""
        ...


class LocalCounters:
    scope = "process"

    def __init__(self, *, max_items: int = 100_000) -> None:
        self._values: dict[str, int] = {}
        self._max = max_items

    async def charge(self, name: str, *, limit: int, cost: int, force: bool = False,
                     seed: int | None = None, ttl_s: int = 0) -> tuple[bool, int] | None:
        value = self._values.get(name)
        if value is None:
            if seed is None:
                return None
            if len(self._values) >= self._max:
                self._values.clear()  # they re-seed from the store
            value = seed
        if force or value + cost <= limit:
            value += cost
            self._values[name] = value
            return True, value
        self._values[name] = value
        return False, value

    async def lift(self, name: str, value: int, *, ttl_s: int = 0) -> None:
        self._values[name] = max(self._values.get(name, value), value)


class SharedCounters:
    """Counters in the node's :class:`~gazsi_cluster.auth.shared_limits.SharedBuckets` table."""

    scope = "node"

    def __init__(self, table: Any) -> None:
        self.table = table

    async def charge(self, name: str, *, limit: int, cost: int, force: bool = False,
                     seed: int | None = None, ttl_s: int = 0) -> tuple[bool, int] | None:
        out: tuple[bool, int] | None = self.table.counter_charge(name, limit=limit, cost=cost, force=force)
        if out is None and seed is not None:
            self.table.counter_seed(name, seed)
            out = self.table.counter_charge(name, limit=limit, cost=cost, force=force)
        return out

    async def lift(self, name: str, value: int, *, ttl_s: int = 0) -> None:
        self.table.counter_seed(name, value, raise_to=True)


class RedisCounters:
    """Cluster-wide counters (one Lua call per charge); ``fallback`` answers while Redis is down."""

    scope = "cluster"

    def __init__(self, redis: Any, health: RedisHealth, *, fallback: Counters, prefix: str = "gazsi:quota:") -> None:
        self.redis, self.health, self.fallback, self.prefix = redis, health, fallback, prefix
        self._script = redis.register_script(_LUA)

    async def charge(self, name: str, *, limit: int, cost: int, force: bool = False,
                     seed: int | None = None, ttl_s: int = 0) -> tuple[bool, int] | None:
        from redis.exceptions import RedisError

        if self.health.usable():
            try:
                allowed, value = await self._script(
                    keys=[self.prefix + name],
                    args=[limit, cost, int(force), "" if seed is None else seed, max(1, ttl_s)],
                )
            except (RedisError, OSError) as exc:
                self.health.failed(exc)
            else:
                self.health.ok()
                return None if int(allowed) < 0 else (bool(allowed), int(value))
        return await self.fallback.charge(name, limit=limit, cost=cost, force=force, seed=seed, ttl_s=ttl_s)

    async def lift(self, name: str, value: int, *, ttl_s: int = 0) -> None:
        # The Redis counter is the cluster's truth already; only the fallback needs lifting.
        await self.fallback.lift(name, value, ttl_s=ttl_s)


@dataclass(frozen=True, slots=True)
class _Period:
    label: str  # "daily" | "monthly"
    limit: int
    start: date
    resets_at: float  # epoch seconds
    counter: str


def _periods(record: KeyRecord, now: float) -> list[_Period]:
    today = datetime.fromtimestamp(now, UTC).date()
    out: list[_Period] = []
    if record.daily_quota:
        nxt = today + timedelta(days=1)
        out.append(_Period("daily", record.daily_quota, today,
                           datetime(nxt.year, nxt.month, nxt.day, tzinfo=UTC).timestamp(),
                           f"{record.id}:d:{today:%Y%m%d}"))
    if record.monthly_quota:
        month = today.replace(day=1)
        nxt = date(month.year + (month.month == 12), month.month % 12 + 1, 1)
        out.append(_Period("monthly", record.monthly_quota, month,
                           datetime(nxt.year, nxt.month, 1, tzinfo=UTC).timestamp(),
                           f"{record.id}:m:{month:%Y%m}"))
    return out


def _in(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    if minutes >= 48 * 60:
        return f"{minutes // 1440}d {minutes % 1440 // 60}h"
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


class QuotaBook:
    """The budget checks :class:`~gazsi_cluster.auth.authorizer.KeyAuthorizer` runs per request."""

    def __init__(
        self, store: KeyStore, counters: Counters, *, before_seed: Callable[[], Awaitable[object]],
        refresh_s: float = 5.0,
    ) -> None:
        self.store, self.counters = store, counters
        self._before_seed = before_seed
        self.refresh_s = refresh_s
        self._lifted: dict[str, float] = {}

    async def _seed(self, key_id: str, period: _Period) -> int:
        # Flush first so the store's total includes what this process already served.
        await self._before_seed()
        return await self.store.tokens_since(key_id, period.start)

    async def _charge(self, record: KeyRecord, period: _Period, cost: int, force: bool) -> tuple[bool, int]:
        ttl = int(period.resets_at - time.time()) + 86_400
        if self.counters.scope != "cluster":
            await self._maybe_lift(record, period, ttl)
        out = await self.counters.charge(period.counter, limit=period.limit, cost=cost, force=force, ttl_s=ttl)
        if out is None:
            seed = await self._seed(record.id, period)
            out = await self.counters.charge(period.counter, limit=period.limit, cost=cost, force=force,
                                             seed=seed, ttl_s=ttl)
        assert out is not None
        return out

    async def _maybe_lift(self, record: KeyRecord, period: _Period, ttl: int) -> None:
        now = time.monotonic()
        last = self._lifted.get(period.counter)
        if last is not None and now - last < self.refresh_s:
            return
        if len(self._lifted) > 100_000:
            self._lifted.clear()
        self._lifted[period.counter] = now
        if last is not None:  # the first charge seeds from the store anyway
            await self.counters.lift(period.counter, await self.store.tokens_since(record.id, period.start),
                                     ttl_s=ttl)

    async def check(self, record: KeyRecord, now: float) -> None:
        """Refuse a key whose budget is spent (before anything else of the request runs)."""
        for period in _periods(record, now):
            _ok, used = await self._charge(record, period, 0, force=False)
            if used >= period.limit:
                raise self._exceeded(record, period, now, used, None)

    async def reserve(self, record: KeyRecord, now: float, tokens: int) -> list[tuple[str, int]]:
        """Charge ``tokens`` to every budget of the key or to none; returns what was charged."""
        charged: list[tuple[str, int]] = []
        for period in _periods(record, now):
            ok, used = await self._charge(record, period, tokens, force=False)
            if not ok:
                for counter, cost in charged:  # give back what the earlier periods took
                    await self.counters.charge(counter, limit=0, cost=-cost, force=True)
                raise self._exceeded(record, period, now, used, tokens)
            charged.append((period.counter, tokens))
        return charged

    async def settle(self, record: KeyRecord, now: float, delta: int) -> None:
        """Add ``delta`` (served minus reserved; negative refunds) to every budget of the key."""
        if delta:
            for period in _periods(record, now):
                await self._charge(record, period, delta, force=True)

    @staticmethod
    def _exceeded(record: KeyRecord, period: _Period, now: float, used: int, need: int | None) -> QuotaExceeded:
        when = f"it resets at {format_utc(period.resets_at)} (in {_in(period.resets_at - now)})"
        if need is None or used >= period.limit:
            msg = (f"The {period.label} token budget of {period.limit} tokens for key {record.prefix}… is "
                   f"spent; {when}.")
        else:
            msg = (f"This request needs {need} tokens but only {period.limit - used} of the {period.label} "
                   f"budget of {period.limit} tokens for key {record.prefix}… remain; {when}.")
        return QuotaExceeded(msg, retry_after=max(1.0, period.resets_at - now), key_id=record.id,
                             period=period.label)
