"""Dynamic batcher: many requests' inputs become few engine calls.

Written rules (after Ray Serve's ``batching.py`` and TEI's ``queue.rs``):

1. Admission is bounded and fails fast: at most ``queue_capacity`` requests and
   ``max_queued_tokens`` tokens are admitted at once; beyond that :class:`Overloaded` (429) at once.
2. A batch starts when its first input arrives, then waits at most ``max_wait_us`` for company,
   and stops growing at ``max_batch_size`` inputs or ``max_batch_tokens`` padded tokens.
3. The oldest input always rides in the next batch (no starvation); the rest of the batch is
   chosen among the next ``length_window`` inputs by closeness in length, to keep padding low.
4. Cancelled inputs (client gone) are dropped before running; inputs past their deadline are
   failed with :class:`DeadlineExceeded` and dropped.
5. Inference runs in worker threads (``pipeline_depth`` batches in flight), never on the event loop.
6. On engine failure every waiter of that batch gets :class:`EngineError`; the loop keeps running.
7. The engine must return exactly one row per input, or the whole batch fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gazsi_cluster.config import BatcherConfig
from gazsi_cluster.errors import DeadlineExceeded, EngineError, Overloaded, ServiceUnavailable

__all__ = ["BatchStats", "Batcher", "EmbedFn", "ItemResult"]

log = logging.getLogger(__name__)

EmbedFn = Callable[[Sequence[np.ndarray]], np.ndarray]


class BatchObserver(Protocol):
    def on_batch(self, stats: BatchStats) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchStats:
    size: int
    padded_tokens: int
    real_tokens: int
    formed_at: float
    infer_start: float
    infer_end: float


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One input's embedding and the facts of the batch it rode in."""

    embedding: np.ndarray
    batch: BatchStats


@dataclass(slots=True, eq=False)
class _Item:
    ids: np.ndarray
    future: asyncio.Future[ItemResult]
    deadline: float
    enqueued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects inputs into batches and runs them through ``embed_fn`` off the event loop.

    ``embed_fn`` receives the batch's token arrays (unpadded) and returns float32 (B, D); it
    owns padding so each engine can pick its own shape buckets.
    """

    def __init__(
        self,
        embed_fn: EmbedFn,
        config: BatcherConfig,
        *,
        max_seq_len: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self._embed_fn = embed_fn
        self.config = config
        self._max_seq_len = max_seq_len
        self._observer = observer
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._admitted_requests = 0
        self._admitted_tokens = 0
        self._in_flight_batches = 0
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._closing = False
        self._executor = ThreadPoolExecutor(self.config.pipeline_depth, thread_name_prefix="gazsi-infer")
        self._loop_task = asyncio.create_task(self._run(), name="gazsi-batcher")

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop admitting, let queued work finish (bounded), then fail what is left."""
        self._closing = True
        deadline = time.perf_counter() + drain_timeout_s
        while (self._pending or self._batch_tasks) and time.perf_counter() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        for task in list(self._batch_tasks):
            task.cancel()
        if self._batch_tasks:
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(ServiceUnavailable("the edge node is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done() and not self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight_requests(self) -> int:
        return self._admitted_requests

    def reconfigure(self, config: BatcherConfig) -> None:
        """Apply new limits without a restart (worker count changes apply at next start)."""
        self.config = config
        self._wakeup.set()

    # -- submission ----------------------------------------------------------------------
    def submit(self, seqs: Sequence[np.ndarray], timeout_s: float | None = None) -> list[asyncio.Future[ItemResult]]:
        """Admit one request's inputs or raise :class:`Overloaded` at once.

        Returns one future per input; the admission is released when all of them are done.
        """
        if self._closing or self._loop_task is None:
            raise ServiceUnavailable("the batcher is not running", retry_after=1.0)
        cfg = self.config
        tokens = sum(len(s) for s in seqs)
        if self._admitted_requests + 1 > cfg.queue_capacity or self._admitted_tokens + tokens > cfg.max_queued_tokens:
            raise Overloaded(
                "The edge node is at capacity; retry shortly.",
                retry_after=1.0,
                queued=self._admitted_requests,
                limit=cfg.queue_capacity,
            )
        self._admitted_requests += 1
        self._admitted_tokens += tokens
        loop = asyncio.get_running_loop()
        deadline = time.perf_counter() + (timeout_s if timeout_s is not None else cfg.request_timeout_s)
        futures: list[asyncio.Future[ItemResult]] = []
        for seq in seqs:
            fut: asyncio.Future[ItemResult] = loop.create_future()
            futures.append(fut)
            self._pending.append(_Item(seq, fut, deadline))
        remaining = len(futures)

        def _release(_f: asyncio.Future[ItemResult]) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self._admitted_requests -= 1
                self._admitted_tokens -= tokens

        for fut in futures:
            fut.add_done_callback(_release)
        self._wakeup.set()
        return futures

    # -- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.config.pipeline_depth)
        while True:
            await slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                slots.release()
                raise
            if not batch:
                slots.release()
                continue
            task = asyncio.create_task(self._run_batch(batch))
            self._batch_tasks.add(task)

            def _done(t: asyncio.Task[None]) -> None:
                self._batch_tasks.discard(t)
                slots.release()

            task.add_done_callback(_done)

    async def _next_batch(self) -> list[_Item]:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        cfg = self.config
        if cfg.max_wait_us > 0 and len(self._pending) < cfg.max_batch_size:
            first_at = time.perf_counter()
            limit = first_at + cfg.max_wait_us / 1e6
            while len(self._pending) < cfg.max_batch_size and not self._closing:
                remaining = limit - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
        return self._take_batch()

    @staticmethod
    def _is_dead(item: _Item, now: float) -> bool:
        """Rule 4: a cancelled input is dead; an expired one is failed, then dead."""
        if item.future.done():
            return True
        if now >= item.deadline:
            item.future.set_exception(DeadlineExceeded("the request's deadline passed before it was run"))
            return True
        return False

    def _take_batch(self) -> list[_Item]:
        now = time.perf_counter()
        pending = self._pending
        while pending and self._is_dead(pending[0], now):
            pending.popleft()
        if not pending:
            return []
        cfg = self.config
        max_n, max_tokens = cfg.max_batch_size, cfg.max_batch_tokens
        oldest = pending.popleft()
        batch = [oldest]
        longest = len(oldest.ids)
        # Work on a window at the head only, so a long queue costs O(window) per batch.
        window = [pending.popleft() for _ in range(min(len(pending), cfg.length_window))]
        live = [item for item in window if not self._is_dead(item, now)]
        # Rule 3: candidates nearest the oldest input's length first (stable sort keeps FIFO on ties).
        anchor = len(oldest.ids)
        order = sorted(range(len(live)), key=lambda i: abs(len(live[i].ids) - anchor))
        taken: set[int] = set()
        for i in order:
            if len(batch) >= max_n:
                break
            new_longest = max(longest, len(live[i].ids))
            if (len(batch) + 1) * min(new_longest, self._max_seq_len) > max_tokens:
                continue
            batch.append(live[i])
            longest = new_longest
            taken.add(i)
        for i in range(len(live) - 1, -1, -1):
            if i not in taken:
                pending.appendleft(live[i])
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        formed_at = time.perf_counter()
        seqs = [item.ids for item in batch]
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        timed = _TimedCall(self._embed_fn, seqs)
        try:
            out = await loop.run_in_executor(self._executor, timed)
            if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != len(batch):
                raise EngineError(
                    f"engine returned {getattr(out, 'shape', type(out))} for a batch of {len(batch)}",
                    batch=len(batch),
                )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ServiceUnavailable("the edge node is shutting down"))
            raise
        except Exception as exc:
            log.error("batch of %d failed: %r", len(batch), exc)
            err = exc if isinstance(exc, EngineError) else EngineError("inference failed for this batch")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        padded = len(batch) * min(max(len(s) for s in seqs), self._max_seq_len)
        stats = BatchStats(
            size=len(batch),
            padded_tokens=padded,
            real_tokens=sum(len(s) for s in seqs),
            formed_at=formed_at,
            infer_start=timed.started,
            infer_end=timed.ended,
        )
        for row, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result(ItemResult(out[row], stats))
        if self._observer is not None:
            self._observer.on_batch(stats)


class _TimedCall:
    """Runs the engine in the worker thread and records when inference really started/ended."""

    __slots__ = ("ended", "fn", "seqs", "started")

    def __init__(self, fn: EmbedFn, seqs: Sequence[np.ndarray]) -> None:
        self.fn, self.seqs = fn, seqs
        self.started = self.ended = 0.0

    def __call__(self) -> np.ndarray:
        self.started = time.perf_counter()
        try:
            return self.fn(self.seqs)
        finally:
            self.ended = time.perf_counter()
