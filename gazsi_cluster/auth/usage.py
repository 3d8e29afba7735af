"""Usage accounting off the request path: counts per (key, model, day) buffered and written to the
store in batches by one background task.

With a journal (the default: :mod:`gazsi_cluster.auth.usage_journal`) every increment is also
appended to the process's journal file as it happens, so nothing answered is lost if the
database is down when the process dies; the journal is what gets applied (exactly once), and
journals of dead processes are replayed by whichever process finds them first. Without one,
the buffer is bounded by distinct rows; when it is full new rows are dropped and counted
(``gazsi_usage_rows_dropped_total``) rather than growing without bound while the database is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, date, datetime

from gazsi_cluster.auth.keys import UsageRow
from gazsi_cluster.auth.store import JournalSegment, KeyStore
from gazsi_cluster.auth.usage_journal import Orphan, UsageJournal
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
        journal: UsageJournal | None = None, orphan_scan_s: float = 10.0,
    ) -> None:
        self.store = store
        self.max_rows = max_rows
        self.flush_interval_s = flush_interval_s
        self.journal = journal
        self.orphan_scan_s = orphan_scan_s
        # Without a journal: everything not yet written. With one: the active segment's rows.
        self._rows: dict[tuple[str, str, date], list[int]] = {}
        self._on_drop = on_drop or (lambda n: None)
        self._on_flush = on_flush or (lambda ok: None)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._next_scan = 0.0
        self.dropped = 0
        self.journal_errors = 0
        self.replayed_segments = 0

    def open(self) -> None:
        """Start the journal (creates its directory and lock); a no-op without one. A journal
        that cannot be created (read-only data directory) is turned off, loudly, not fatal."""
        if self.journal is not None:
            try:
                self.journal.open()
            except OSError as exc:
                log.error("usage journal disabled: cannot write %s (%s); buffered usage is lost if this "
                          "process dies before a flush", self.journal.directory, exc)
                self.journal = None

    def add(self, key_id: str, model: str, day: date, *, requests: int = 1, tokens: int = 0,
            cached_tokens: int = 0) -> None:
        """O(1) and synchronous (one ``write(2)`` with a journal): the request path never waits for
        the database."""
        key = (key_id, model, day)
        slot = self._rows.get(key)
        if slot is None and len(self._rows) >= self.max_rows:
            if self.journal is None:
                self.dropped += 1
                self._on_drop(1)
                self._wake.set()
                return
            # Memory holds one segment's rows at most: seal it (before this line is written, so
            # the sealed file and its rows agree) and start another.
            self._seal()
        if self.journal is not None:
            try:
                self.journal.append(key_id, model, day, requests, tokens, cached_tokens)
            except OSError as exc:
                # A full or failing disk must not fail the request that was already served: the
                # increment stays in memory (written with the next flush) and the failure counted.
                self.journal_errors += 1
                if self.journal_errors == 1 or self.journal_errors % 1000 == 0:
                    log.error("usage journal write failed (%s); %d failures so far", exc, self.journal_errors)
        if slot is None:
            slot = self._rows[key] = [0, 0, 0]
            if len(self._rows) >= self.max_rows // 2:
                self._wake.set()
        slot[0] += requests
        slot[1] += tokens
        slot[2] += cached_tokens

    def _seal(self) -> None:
        assert self.journal is not None
        rows = tuple(UsageRow(k, m, d, v[0], v[1], v[2]) for (k, m, d), v in self._rows.items())
        self._rows = {}
        self.journal.seal(rows)
        # A long outage piles up sealed segments: past a few buffers' worth, read them back from disk.
        self.journal.release_memory(4 * self.max_rows)

    def pending(self) -> int:
        """Rows not yet in the store (distinct (key, model, day) per journal segment)."""
        sealed = 0
        if self.journal is not None:
            sealed = sum(len(s.rows) if s.rows is not None else 1 for s in self.journal.sealed)
        return len(self._rows) + sealed

    async def flush(self) -> bool:
        """Write what is buffered; on failure nothing is lost (kept in memory, or in the journal)."""
        async with self._lock:
            if self.journal is not None:
                return await self._flush_journal(self.journal)
            if not self._rows:
                return True
            batch, self._rows = self._rows, {}
            rows = [UsageRow(k, m, d, v[0], v[1], v[2]) for (k, m, d), v in batch.items()]
            try:
                await self.store.add_usage(rows)
            except (GazsiError, OSError) as exc:
                log.warning("usage flush failed (%s); %d rows kept for the next try", exc, len(rows))
                for row in rows:
                    self.add(row.key_id, row.model, row.day, requests=row.requests, tokens=row.tokens,
                             cached_tokens=row.cached_tokens)
                self._on_flush(False)
                return False
            self._on_flush(True)
            return True

    async def _flush_journal(self, journal: UsageJournal) -> bool:
        if self._rows:
            self._seal()
        orphans: list[Orphan] = []
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + self.orphan_scan_s
            orphans = journal.orphans()
        if not journal.sealed and not orphans:
            return True
        # add() may seal another segment while the store works: only what was offered is deleted.
        upto = journal.sealed[-1].seq if journal.sealed else 0
        segments: list[JournalSegment] = journal.segments()
        for orphan in orphans:
            segments.extend(journal.orphan_segments(orphan))
        try:
            await self.store.apply_journal(segments)
        except (GazsiError, OSError) as exc:
            log.warning("usage flush failed (%s); %d journal segments kept on disk for the next try",
                        exc, len(segments))
            journal.sync()
            for orphan in orphans:
                journal.release(orphan)
            self._next_scan = 0.0  # look for orphans again as soon as the store is back
            self._on_flush(False)
            return False
        journal.applied(upto)
        for orphan in orphans:
            self.replayed_segments += len(orphan.segments)
            if orphan.segments:
                log.info("replayed %d usage journal segments of %s", len(orphan.segments), orphan.writer)
            journal.remove(orphan)
        self._on_flush(True)
        return True

    async def run(self) -> None:
        """Flush every ``flush_interval_s`` or sooner when the buffer fills; until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                # Keep flushing: what was not written stays buffered (or journaled) for the next try.
                log.exception("usage flush failed unexpectedly; retrying")

    def close(self) -> None:
        """Close the journal (after a last :meth:`flush`); what the store did not take stays on disk."""
        if self.journal is not None:
            self.journal.close()
