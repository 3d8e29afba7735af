"""Admission that holds load (issue 15): hot ``/inference`` heads that found every GPU ring slot taken wait
here, a heap by arrival, until slots free (oldest first back into a burst) or their deadline passes (then the
plane answers 429 with ``Retry-After``). The plane used to refuse at once, and load became 429 storms."""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .feed import FeedConnection

__all__ = ["SlotWaiters"]


class SlotWaiters:
    """Heads waiting for a ring slot for at most ``wait_s``; a client that left is dropped when reached."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._heap: list[tuple[int, int, FeedConnection, bytes, bool]] = []  # (t0, seq, conn, head, keep-alive)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, t0_ns: int, conn: FeedConnection, head: bytes, keep: bool) -> None:
        heapq.heappush(self._heap, (t0_ns, next(self._seq), conn, head, keep))

    def expired(self, now_ns: int) -> list[tuple[int, FeedConnection, bool]]:
        """(arrival, connection, keep-alive) of the heads that have waited past ``wait_s``, taken out."""
        before = now_ns - int(self.wait_s * 1e9)
        out = []
        while self._heap and self._heap[0][0] < before:
            t0, _, conn, _, keep = heapq.heappop(self._heap)
            if not conn.closed:
                out.append((t0, conn, keep))
        return out

    def oldest(self, n: int) -> list[tuple[FeedConnection, bytes, int]]:
        """Up to ``n`` of the oldest heads, taken out, as burst entries (connection, head, arrival)."""
        out: list[tuple[FeedConnection, bytes, int]] = []
        while self._heap and len(out) < n:
            t0, _, conn, head, _ = heapq.heappop(self._heap)
            if not conn.closed:
                out.append((conn, head, t0))
        return out
