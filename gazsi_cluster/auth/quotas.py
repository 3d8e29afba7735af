"""Token budgets per key and period (UTC day, calendar month).

A budget is a counter per (key, period) holding the tokens used so far (:class:`~gazsi_cluster.auth.limits.Op`
with ``counter=True``), charged with the request's other limits in one all-or-nothing step:
checked when the key is authorised, charged before the work (``reserve_tokens``), settled when
it finishes. It is seeded once from the key store's total for the period (:meth:`QuotaBook.seeds`).
Where the counter lives decides who shares it: Redis (every process of the cluster), the node's
shared-memory table (every process of one node), or a dict (one process). Without Redis, each
process lifts the counter to the store's total now and then, so usage that other nodes wrote
counts too (never lowered: that would forget usage not yet flushed).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from gazsi_cluster.auth.keys import KeyRecord, format_utc
from gazsi_cluster.auth.limits import Op, RateLimiter, limit_name
from gazsi_cluster.auth.store import KeyStore
from gazsi_cluster.errors import QuotaExceeded

__all__ = ["Period", "QuotaBook", "periods"]

_DAY = 86_400


@dataclass(frozen=True, slots=True)
class Period:
    label: str  # "daily" | "monthly"
    limit: int
    start: date
    resets_at: float  # epoch seconds
    counter: str  # the limiter's name for this key's counter in this period

    def op(self, cost: int, *, force: bool = False, seed: int | None = None) -> Op:
        # Kept a day past the period's end: a late settlement still finds it.
        ttl = max(1, int(self.resets_at - time.time()) + _DAY)
        return Op(self.counter, self.limit, cost, force, counter=True, seed=seed, ttl_s=ttl)


_cache: dict[tuple[str, int, int | None, int | None], tuple[Period, ...]] = {}


def periods(record: KeyRecord, now: float) -> tuple[Period, ...]:
    """The key's budget periods at ``now`` (memoised per UTC day: the hot path calls this)."""
    if not (record.daily_quota or record.monthly_quota):
        return ()
    day_index = int(now // _DAY)  # UTC days are whole multiples of 86,400 epoch seconds
    memo = (record.id, day_index, record.daily_quota, record.monthly_quota)
    found = _cache.get(memo)
    if found is not None:
        return found
    today = datetime.fromtimestamp(day_index * _DAY, UTC).date()
    out: list[Period] = []
    if record.daily_quota:
        out.append(Period("daily", record.daily_quota, today, (day_index + 1) * _DAY,
                          limit_name(record.id, f"d{today:%Y%m%d}")))
    if record.monthly_quota:
        month = today.replace(day=1)
        nxt = date(month.year + (month.month == 12), month.month % 12 + 1, 1)
        out.append(Period("monthly", record.monthly_quota, month,
                          datetime(nxt.year, nxt.month, 1, tzinfo=UTC).timestamp(), limit_name(record.id, f"m{month:%Y%m}")))
    if len(_cache) > 100_000:
        _cache.clear()
    found = _cache[memo] = tuple(out)
    return found


def _in(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    if minutes >= 48 * 60:
        return f"{minutes // 1440}d {minutes % 1440 // 60}h"
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


class QuotaBook:
    """Seeds budget counters from the store, keeps them lifted without Redis, words refusals."""

    def __init__(
        self, store: KeyStore, limiter: RateLimiter, *, before_seed: Callable[[], Awaitable[object]],
        refresh_s: float = 5.0,
    ) -> None:
        self.store, self.limiter = store, limiter
        self._before_seed = before_seed
        self.refresh_s = refresh_s
        self._lifted: dict[str, float] = {}

    async def seed(self, record: KeyRecord, period: Period) -> int:
        """The period's total in the store (this process's buffered usage flushed first)."""
        await self._before_seed()
        return await self.store.tokens_since(record.id, period.start)

    async def refresh(self, record: KeyRecord, ps: Sequence[Period]) -> None:
        """Without a cluster-wide store: every ``refresh_s`` per counter, lift it to the store's
        total (what other nodes wrote since). A store that is down leaves it as it is."""
        if self.limiter.scope == "cluster":
            return
        now = time.monotonic()
        for period in ps:
            last = self._lifted.get(period.counter)
            if last is not None and now - last < self.refresh_s:
                continue
            if len(self._lifted) > 100_000:
                self._lifted.clear()
            self._lifted[period.counter] = now
            if last is None:
                continue  # the first charge seeds from the store anyway
            total = await self.store.tokens_since(record.id, period.start)
            await self.limiter.lift(period.counter, total, ttl_s=period.op(0).ttl_s)

    @staticmethod
    def exceeded(record: KeyRecord, period: Period, now: float, used: float, need: int | None) -> QuotaExceeded:
        when = f"it resets at {format_utc(period.resets_at)} (in {_in(period.resets_at - now)})"
        if need is None or used >= period.limit:
            msg = (f"The {period.label} token budget of {period.limit} tokens for key {record.prefix}… is "
                   f"spent; {when}.")
        else:
            msg = (f"This request needs {need} tokens but only {int(period.limit - used)} of the {period.label} "
                   f"token budget of {period.limit} tokens for key {record.prefix}… remain; {when}.")
        return QuotaExceeded(msg, retry_after=max(1.0, period.resets_at - now), key_id=record.id,
                             period=period.label)
