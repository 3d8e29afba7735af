"""The gpu plane's per-stage table: each ring slot's T0..T8 (GAZSI's stamps), kept as the slot is freed and
summarised for ``/readyz`` and the benchmarks.

T0 head framed, T1 burst launched, T2 admitted (GPU clock), T3 taken by the CPU, T4/T5 inference start/end,
T6 built (GPU clock, the build kernel), T7 answer written, T8 slot released.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .ring import HostRing

__all__ = ["STAGES", "StageTable"]

RECENT_MARKS = 20_000  # slots whose T0..T8 the table keeps
WINDOW_S = 5.0  # ... of those, the ones released this recently: a quiet spell is not read as a busy one
# (stage, from mark, to mark); T2 and T6 are GPU-clock marks, the rest CPU.
STAGES = (("T0-T1 head to burst launch", 0, 1), ("T1-T3 admit kernel to CPU take", 1, 3),
          ("T3-T4 wait for a batch", 3, 4), ("T4-T5 inference", 4, 5), ("T5-T7 answer built and written", 5, 7),
          ("T7-T8 release", 7, 8), ("T2-T6 on the GPU clock: ready to built", 2, 6), ("T0-T8 total (CPU)", 0, 8))


class StageTable:
    """T0..T8 of the most recent slots, a preallocated circle. A deque of per-slot copies cost 22 ms a second
    to stack (2 % of a busy feed's core on the 2-core machine, py-spy)."""

    def __init__(self) -> None:
        self.marks = np.zeros((RECENT_MARKS, 9), dtype=np.int64)
        self.n = 0

    def finish(self, ring: HostRing, slot: int, free: Callable[[int], None]) -> None:
        """T7, then ``free`` the slot (it stamps T8), keeping its marks: copied before the release, since a free
        slot may be admitted and stamped again by the GPU; T8 after it (only the CPU writes T8)."""
        ring.stamp(slot, 7)
        i = self.n % len(self.marks)
        self.n += 1
        self.marks[i] = ring.v.ts[slot]
        free(slot)
        self.marks[i, 8] = ring.v.ts[slot, 8]

    def summary(self, window_s: float = WINDOW_S) -> dict[str, dict[str, float]]:
        """p50/p99 µs of each stage over the slots released in the last ``window_s`` (at most the last
        20,000). At 3,000 req/s a fixed count of slots still held the busy minute before it (H100,
        2026-12-07: the 10 %-load table read as saturation's).

        Stages are differences within one clock: the CPU marks (``perf_counter_ns``) and the two GPU
        marks (``%globaltimer``) are never subtracted from each other.
        """
        ts = self.marks[:min(self.n, len(self.marks))]
        ts = ts[ts[:, 8] >= time.perf_counter_ns() - int(window_s * 1e9)]
        if not len(ts):
            return {}
        out: dict[str, dict[str, float]] = {}
        for name, a, b in STAGES:
            d = (ts[:, b] - ts[:, a]) / 1e3
            d = d[(ts[:, a] > 0) & (ts[:, b] > 0)]
            if d.size:
                # Nearest ranks by partition: np.percentile took 2.3 ms per stage over 20,000 slots, this 0.3.
                ranks = [(d.size - 1) // 2, (d.size - 1) * 99 // 100]
                p50, p99 = np.partition(d, ranks)[ranks]
                out[name] = {"p50": round(float(p50), 1), "p99": round(float(p99), 1)}
        out["slots"] = {"n": float(len(ts))}
        return out
