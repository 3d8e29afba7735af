"""Usage accounting off the request path: counts per (key, model, day) buffered in memory and
written to the store in batches by one background task.

The buffer is bounded by distinct rows; when it is full new rows are dropped and counted
(``gazsi_usage_rows_dropped_total``) rather than growing without bound while the database is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime

from gazsi_cluster.auth.keys import UsageRow
from gazsi_cluster.auth.store import KeyStore
from gazsi_cluster.errors import GazsiError

__all__ = ["UsageBuffer", "month_start", "utc_day"]

log = logging.getLogger(__name__)


def utc_day(epoch: float) -> date:
    return datetime.fromtimestamp(epoch, UTC).date()


def month_start(day: date) -> date:
    return day.replace(day=1)


class UsageBuffer:
    def __init__(
        self, store: KeyStore, *, max_rows: int = 10_000, flush_interval_s: float = 2.0,
        on_drop: Callable[[int], None] | None = None, on_flush: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.max_rows = max_rows
        self.flush_interval_s = flush_interval_s
        self._rows: dict[tuple[str, str, date], list[int]] = {}
        self._on_drop = on_drop or (lambda n: None)
        self._on_flush = on_flush or (lambda ok: None)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.dropped = 0

    def add(self, key_id: str, model: str, day: date, *, requests: int = 1, tokens: int = 0) -> None:
        """O(1) and synchronous: the request path never waits for the database."""
        slot = self._rows.get((key_id, model, day))
        if slot is None:
            if len(self._rows) >= self.max_rows:
                self.dropped += 1
                self._on_drop(1)
                self._wake.set()
                return
            slot = self._rows[(key_id, model, day)] = [0, 0]
            if len(self._rows) >= self.max_rows // 2:
                self._wake.set()
        slot[0] += requests
        slot[1] += tokens

    def pending(self) -> int:
        return len(self._rows)

    def pending_tokens(self, key_id: str, since: date) -> int:
        return sum(v[1] for (k, _m, d), v in self._rows.items() if k == key_id and d >= since)

    async def flush(self) -> bool:
        """Write the buffer; on failure the rows go back (merged) so nothing is lost while it fits."""
        async with self._lock:
            if not self._rows:
                return True
            batch, self._rows = self._rows, {}
            rows = [UsageRow(k, m, d, v[0], v[1]) for (k, m, d), v in batch.items()]
            try:
                await self.store.add_usage(rows)
            except (GazsiError, OSError) as exc:
                log.warning("usage flush failed (%s); %d rows kept for the next try", exc, len(rows))
                for row in rows:
                    self.add(row.key_id, row.model, row.day, requests=row.requests, tokens=row.tokens)
                self._on_flush(False)
                return False
            self._on_flush(True)
            return True

    async def run(self) -> None:
        """Flush every ``flush_interval_s`` or sooner when the buffer fills; until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            await self.flush()
