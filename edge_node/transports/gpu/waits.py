"""Waiting for launched device work without holding a feed's event loop (``edge.gpu_poll_us``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .device import Launched

__all__ = ["GpuWaits"]

_T = TypeVar("_T")


def _wait_ns(work: Launched[Any]) -> int:
    """On a waiter thread: block until ``work`` is done; when it was seen done (``perf_counter_ns``)."""
    work.wait()
    return time.perf_counter_ns()


class GpuWaits:
    """Where a plane's two loops wait for the GPU: an event's synchronize sleeps on a thread, the GIL released.

    Counts into ``stats`` (the plane's, on ``/readyz``): ``gpu_waits``, ``gpu_waits_off_loop`` (those that
    went to a thread), ``gpu_wait_us`` (from the call to the result) and ``gpu_resume_us`` (from the thread
    seeing the GPU done to the loop running the waiter again: the hand-off's cost).
    """

    def __init__(self, stats: dict[str, int], poll_us: int = 0) -> None:
        self.stats = stats
        self.poll_ns = poll_us * 1000
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="gazsi-gpu-wait")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a wait in progress ends with its event (bounded: kernels are)
            self._pool = None

    async def result(self, work: Launched[_T], *, small: bool = False) -> _T:
        """The result of ``work``, waited for without holding the event loop.

        One turn of the loop first (at load the GPU is usually done by then, and a thread hand-off is
        tens of microseconds); for a ``small`` burst or build (low load, where that hand-off is most of the
        wait) a poll of at most ``edge.gpu_poll_us`` on the loop; then the wait moves to a thread, where a
        blocking-sync event sleeps.
        """
        stats = self.stats
        stats["gpu_waits"] += 1
        t0 = time.perf_counter_ns()
        if not work.done():
            await asyncio.sleep(0)
            if small and self.poll_ns and not work.done():
                until = time.perf_counter_ns() + self.poll_ns
                while not work.done() and time.perf_counter_ns() < until:
                    pass
            if not work.done():
                if self._pool is None:  # stopped meanwhile: still never read a result the GPU has not written
                    work.wait()
                else:
                    stats["gpu_waits_off_loop"] += 1
                    done_ns = await asyncio.get_running_loop().run_in_executor(self._pool, _wait_ns, work)
                    stats["gpu_resume_us"] += (time.perf_counter_ns() - done_ns) // 1000
        stats["gpu_wait_us"] += (time.perf_counter_ns() - t0) // 1000
        return work.result()
