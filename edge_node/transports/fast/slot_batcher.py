"""The engine process's ring-native batch former: whole ring slots in, padded batches out.

Round 1 fed every ring slot through :class:`edge_node.batcher.Batcher` on the engine's event loop:
one asyncio future, a done-callback and a release closure per input. py-spy on the H100 showed that
loop saturated at ~31k req/s while the GPU ran batch 64 in 0.59 ms (docs/benchmarks.md). Here the
unit is the slot, and no event loop is involved: ``pipeline_depth`` threads take turns as the
*former* (leader/followers): the leader sleeps in ``select`` on the request pipe, admits slots,
forms one batch, hands leadership on and runs the batch itself, so the next batch forms while
this one is on the GPU (the engine releases the GIL while it waits for its CUDA event).
Token ids are gathered straight from the shared-memory slots with one fancy-indexing call per
batch and results are scattered back the same way; nothing per input runs in Python.

The batcher's written rules (see :mod:`edge_node.batcher`) hold, with the slot as the unit:

1. Admission is bounded: at most ``queue_capacity`` slots and ``max_queued_tokens`` tokens queued
   or running; beyond that the slot is answered :class:`Overloaded` (429) at once.
2. A batch waits at most ``max_wait_us`` after its oldest slot arrived, and stops at
   ``max_batch_size`` inputs or ``max_batch_tokens`` padded tokens (the first slot always rides).
   When no batch is running at all the batch goes at once: waiting for company only pays while
   the GPU is busy anyway, and at low load it was pure latency.
3. Slots are taken oldest first (no starvation). Unlike :class:`Batcher` there is no length
   window: a FIFO prefix is one slice, and the benchmark's inputs are similar in length.
4. A slot past its deadline is answered :class:`DeadlineExceeded` before running (the worker has
   already answered 504; the reply frees its slot). There is no cancel signal through the ring.
5. Inference runs in these threads, never on the admin app's event loop.
6. An engine failure fails that batch's slots only (:class:`EngineError`); the threads go on.
7. The engine must return exactly one row per input, or the whole batch fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from edge_node.batcher import BatchStats
from edge_node.transports.fast.ring import (
    M_BATCH,
    M_CACHE,
    M_GEN,
    M_INFER_US,
    M_INPUTS,
    M_STATUS,
    M_T_FORMED,
    M_T_INFER0,
    M_T_INFER1,
    M_T_READ,
    M_T_REPLY,
    M_TOKENS,
    SlotRing,
)
from gazsi_cluster.config import BatcherConfig
from gazsi_cluster.errors import DeadlineExceeded, EngineError, GazsiError, Overloaded, ServiceUnavailable

__all__ = ["SlotBatcher"]

log = logging.getLogger(__name__)

EmbedPadded = Callable[[np.ndarray, np.ndarray], np.ndarray]
# One write of at most PIPE_BUF bytes is atomic: replies from two threads never interleave mid-index.
_MAX_WRITE = 1024


class _Observer(Protocol):
    def on_batch(self, stats: BatchStats) -> None: ...


class SlotBatcher:
    """Forms batches of whole ring slots and runs them through ``embed(ids, mask)``.

    >>> sb = SlotBatcher(ring, engine.embed, settings.batcher, max_seq_len=256,  # doctest: +SKIP
    ...                  req_fd=r, resp_fds=[w0, w1], generation=1)
    >>> sb.start(); ...; sb.stop()  # doctest: +SKIP
    """

    def __init__(self, ring: SlotRing, embed: EmbedPadded, config: BatcherConfig, *, max_seq_len: int,
                 req_fd: int, resp_fds: list[int], generation: int, observer: _Observer | None = None) -> None:
        self.ring, self.embed, self.config = ring, embed, config
        self.max_seq_len = max_seq_len
        self.req_fd, self.resp_fds, self.generation = req_fd, resp_fds, generation
        self.observer = observer
        os.set_blocking(req_fd, False)
        self._pending = np.empty(0, dtype=np.int64)
        self._arrived = np.zeros(ring.layout.slots, dtype=np.float64)  # monotonic s, by slot
        self._form_lock = threading.Lock()  # held by the one leader
        self._state = threading.Lock()  # admission counters and in-flight count
        self._admitted_slots = 0
        self._admitted_tokens = 0
        self._in_flight = 0
        self._running: list[np.ndarray] = []  # slots of the batches being run (forget_worker waits on them)
        self._forget: list[tuple[int, threading.Event]] = []  # dead workers whose queued slots must go
        self._tl = threading.local()  # whether this thread's batch still counts as in flight
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._started = False
        self.served = 0
        self.batches = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._started = True
        self._fit_threads()

    def reconfigure(self, config: BatcherConfig) -> None:
        """New rules at once; a new ``pipeline_depth`` starts threads or lets the surplus ones finish and go.

        Serve hands an Edge replica its ``user_config`` after the node started (the engine loaded, these
        threads running): the deployed GPU edge ran one thread where its config said two, and served 32-input
        requests at 0.80x the same node standalone (H100, 2026-12-06).
        """
        self.config = config
        if self._started and not self._stop.is_set():
            self._fit_threads()

    def _fit_threads(self) -> None:
        with self._threads_lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            for i in range(len(self._threads), self.config.pipeline_depth):
                t = threading.Thread(target=self._thread_main, args=(i,), name=f"gazsi-slots-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def _surplus(self, index: int) -> bool:
        """Whether thread ``index`` is beyond ``pipeline_depth`` (then it leaves the list and ends)."""
        if index < self.config.pipeline_depth:
            return False
        with self._threads_lock:
            if index < self.config.pipeline_depth:
                return False
            me = threading.current_thread()
            self._threads = [t for t in self._threads if t is not me]
            return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop forming; running batches finish (bounded); queued slots get 503."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        with self._threads_lock:
            threads, self._threads = self._threads, []
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._form_lock:
            left, self._pending = self._pending, self._pending[:0]
        self._fail(left, ServiceUnavailable("the edge node is shutting down", retry_after=1.0))

    @property
    def queue_depth(self) -> int:
        return int(self._pending.size)

    @property
    def admitted(self) -> int:
        """Slots admitted and not yet answered (queued or running)."""
        return self._admitted_slots

    # -- the threads ---------------------------------------------------------------------
    def _thread_main(self, index: int = 0) -> None:
        self._tl.index = index
        while not self._stop.is_set() and not self._surplus(index):
            # Followers wait for leadership in bounded turns, so a lowered pipeline_depth or stop() reaches them
            # while the leader waits for slots.
            if not self._form_lock.acquire(timeout=0.05):
                continue
            try:
                batch = self._form()
            finally:
                self._form_lock.release()
            if batch is not None and batch.size:
                self._tl.counted = True
                try:
                    self._run(batch)
                except Exception:  # never lose the thread: the batch's slots were answered in _run
                    log.exception("slot batch of %d failed outside the engine", batch.size)
                finally:
                    self._done_in_flight()
                    with self._state:
                        self._running = [b for b in self._running if b is not batch]

    def forget_worker(self, worker: int, timeout_s: float = 5.0) -> None:
        """A worker died: drop its queued slots and wait until no running batch holds any of its slots.

        Its replacement reuses the same slots; a batch still running for the old process must not
        write results into a slot the new one has just filled (blocking: call it off the event loop).
        The leader owns the queue, so it drops the slots itself (within one ``select`` timeout).
        """
        done = threading.Event()
        with self._state:
            self._forget.append((worker, done))
        if not self._threads:
            self._drop_forgotten()
        spw = self.ring.layout.slots_per_worker
        deadline = time.monotonic() + timeout_s
        if not done.wait(timeout_s):
            log.error("slot batcher did not drop worker %d's queued slots in %.1fs", worker, timeout_s)
            return
        while time.monotonic() < deadline:
            with self._state:
                busy = any(bool(((b // spw) == worker).any()) for b in self._running)
            if not busy:
                return
            time.sleep(0.001)
        log.error("worker %d's slots still in a running batch after %.1fs", worker, timeout_s)

    def _drop_forgotten(self) -> None:
        """Leader only (or no thread running): drop the queued slots of workers that died."""
        with self._state:
            forget, self._forget = self._forget, []
        spw = self.ring.layout.slots_per_worker
        for worker, done in forget:
            mine = (self._pending // spw) == worker
            dropped, self._pending = self._pending[mine], self._pending[~mine]
            self._release(dropped)
            done.set()

    def _done_in_flight(self) -> None:
        """Called once per batch as soon as the engine returned (or failed): the GPU is free again.

        Counting it free before the scatter and reply lets the next leader dispatch at once
        instead of waiting ``max_wait_us`` for company that is not coming (rule 2).
        """
        if getattr(self._tl, "counted", False):
            self._tl.counted = False
            with self._state:
                self._in_flight -= 1

    def _form(self) -> np.ndarray | None:
        """Leader only: wait for slots (rule 2), then take a batch and count it in flight."""
        cfg = self.config
        while not self._stop.is_set():
            if self._forget:
                self._drop_forgotten()
            if not self._pending.size:
                if getattr(self._tl, "index", 0) >= self.config.pipeline_depth:
                    return None  # beyond a lowered pipeline_depth: hand leadership on and end
                self._read(0.05)  # bounded so stop() and a new pipeline_depth are noticed
                continue
            self._read(0.0)  # whatever is already in the pipe joins this batch
            now = time.monotonic()
            batch, full = self._take_prefix(now)
            if batch is None:
                continue  # every candidate had expired
            oldest = self._arrived[batch[0]]
            with self._state:
                idle = self._in_flight == 0
            wait_left = oldest + cfg.max_wait_us / 1e6 - now
            if full or idle or wait_left <= 0:
                self._pending = self._pending[batch.size:]
                with self._state:
                    self._in_flight += 1
                    self._running.append(batch)
                self.ring.meta[batch, M_T_FORMED] = time.monotonic_ns()
                return batch
            self._read(wait_left)
        return None

    def _read(self, timeout: float) -> None:
        """Admit the slots waiting in the request pipe (rule 1)."""
        if timeout > 0:
            ready, _, _ = select.select([self.req_fd], [], [], timeout)
            if not ready:
                return
        try:
            data = os.read(self.req_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return
        t_ns = time.monotonic_ns()
        ring = self.ring
        if len(data) == 4 and self._admit_one(int.from_bytes(data, "little"), t_ns):
            return
        idx = np.frombuffer(data, dtype="<u4", count=len(data) // 4).astype(np.int64)
        idx = idx[idx < ring.layout.slots]
        idx = idx[ring.meta[idx, M_GEN] == self.generation]  # left by a previous engine generation
        if not idx.size:
            return
        ring.meta[idx, M_T_READ] = t_ns
        now = time.monotonic()
        expired = ring.deadline[idx] <= now
        if expired.any():
            self._fail(idx[expired], DeadlineExceeded("the request's deadline passed before it was run"))
            idx = idx[~expired]
        cfg = self.config
        tokens = ring.meta[idx, M_TOKENS]
        with self._state:
            # Cumulative sums are monotonic, so what fits is a prefix.
            fits = (self._admitted_slots + np.arange(1, idx.size + 1) <= cfg.queue_capacity) & (
                self._admitted_tokens + np.cumsum(tokens) <= cfg.max_queued_tokens)
            n = int(fits.sum())
            self._admitted_slots += n
            self._admitted_tokens += int(tokens[:n].sum())
            queued = self._admitted_slots
        if n < idx.size:
            self._fail(idx[n:], Overloaded("The edge node is at capacity; retry shortly.", retry_after=1.0,
                                           queued=queued, limit=cfg.queue_capacity))
        self._arrived[idx[:n]] = now
        self._pending = np.concatenate((self._pending, idx[:n]))

    def _admit_one(self, slot: int, t_ns: int) -> bool:
        """Scalar path for the low-load case (one index per read): numpy's per-call overhead on
        tiny arrays was most of the ~140 us between pipe read and batch formed (H100 stages run).
        False: not the easy case, the caller takes the general path."""
        ring, cfg = self.ring, self.config
        if slot >= ring.layout.slots or int(ring.meta[slot, M_GEN]) != self.generation:
            return True  # left by a previous engine generation
        now = time.monotonic()
        tokens = int(ring.meta[slot, M_TOKENS])
        if float(ring.deadline[slot]) <= now:
            return False
        with self._state:
            if (self._admitted_slots + 1 > cfg.queue_capacity
                    or self._admitted_tokens + tokens > cfg.max_queued_tokens):
                return False
            self._admitted_slots += 1
            self._admitted_tokens += tokens
        ring.meta[slot, M_T_READ] = t_ns
        self._arrived[slot] = now
        if self._pending.size:
            self._pending = np.append(self._pending, slot)
        else:
            self._pending = np.array([slot], dtype=np.int64)
        return True

    def _take_prefix(self, now: float) -> tuple[np.ndarray | None, bool]:
        """The FIFO prefix of pending slots that fits the caps, and whether the batch is full."""
        cfg, ring = self.config, self.ring
        if self._pending.size == 1 and float(ring.deadline[self._pending[0]]) > now:
            return self._pending, int(ring.meta[self._pending[0], M_INPUTS]) >= cfg.max_batch_size
        cand = self._pending[: cfg.max_batch_size]  # each slot holds >= 1 input
        dead = ring.deadline[cand] <= now
        if dead.any():
            self._fail(cand[dead], DeadlineExceeded("the request's deadline passed before it was run"))
            self._release(cand[dead])
            self._pending = np.concatenate((cand[~dead], self._pending[cand.size:]))
            return None, False
        inputs = ring.meta[cand, M_INPUTS]
        longest = ring.meta[cand, M_TOKENS].copy()
        multi = inputs > 1
        if multi.any():
            lens = ring.lengths[cand[multi]]
            cols = np.arange(lens.shape[1])
            longest[multi] = np.where(cols[None, :] < inputs[multi, None], lens, 0).max(axis=1)
        rows = np.cumsum(inputs)
        padded = rows * np.maximum.accumulate(np.minimum(longest, self.max_seq_len))
        ok = (rows <= cfg.max_batch_size) & (padded <= cfg.max_batch_tokens)
        k = max(1, int(np.argmin(ok)) if not ok.all() else int(ok.size))
        full = k < self._pending.size or int(rows[k - 1]) >= cfg.max_batch_size
        return cand[:k], full

    # -- one batch -----------------------------------------------------------------------
    def _run(self, slots: np.ndarray) -> None:
        ring = self.ring
        formed = time.perf_counter()
        inputs = ring.meta[slots, M_INPUTS]
        if bool((inputs == 1).all()):  # single-input slots: the common case, no per-row bookkeeping
            src, within = slots, np.zeros(slots.size, dtype=np.int64)
            lens = ring.meta[slots, M_TOKENS]
            offs = within
        else:
            src = np.repeat(slots, inputs)
            first_row = np.repeat(np.cumsum(inputs) - inputs, inputs)
            within = np.arange(src.size) - first_row
            lens = ring.lengths[src, within].astype(np.int64)
            starts = np.cumsum(lens) - lens
            offs = starts - starts[first_row]
        width = max(1, min(int(lens.max()), self.max_seq_len))
        cols = np.arange(width)
        mask = cols[None, :] < np.minimum(lens, width)[:, None]
        pos = np.minimum(offs[:, None] + cols[None, :], ring.layout.slot_tokens - 1)
        # int64, as the engine contract says: ONNX Runtime refuses int32 ids (every request got 500).
        ids = np.where(mask, ring.tokens[src[:, None], pos], 0).astype(np.int64)
        rows = int(src.size)
        t0 = time.perf_counter()
        ring.meta[slots, M_T_INFER0] = time.monotonic_ns()
        try:
            try:
                out = self.embed(ids, mask.astype(np.int64))
            finally:
                self._done_in_flight()
            if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != rows:
                raise EngineError(f"engine returned {getattr(out, 'shape', type(out))} for a batch of {rows}",
                                  batch=rows)
        except Exception as exc:  # rule 6: this batch only
            log.error("batch of %d slots (%d inputs) failed: %r", slots.size, rows, exc)
            err = exc if isinstance(exc, EngineError) else EngineError("inference failed for this batch")
            self._release(slots)
            self._fail(slots, err)
            return
        t1 = time.perf_counter()
        meta = ring.meta
        meta[slots, M_T_INFER1] = time.monotonic_ns()
        ring.vectors[src, within] = out
        meta[slots, M_BATCH] = rows
        meta[slots, M_INFER_US] = int((t1 - t0) * 1e6)
        meta[slots, M_CACHE] = 0
        meta[slots, M_STATUS] = 1
        self._release(slots)
        self._reply(slots)
        self.served += int(slots.size)
        self.batches += 1
        if self.observer is not None:
            self.observer.on_batch(BatchStats(size=rows, padded_tokens=rows * width, real_tokens=int(lens.sum()),
                                              formed_at=formed, infer_start=t0, infer_end=t1))

    # -- answers -------------------------------------------------------------------------
    def _release(self, slots: np.ndarray) -> None:
        """Admission is given back when a slot leaves the queue for good (answered)."""
        if not slots.size:
            return
        tokens = int(self.ring.meta[slots, M_TOKENS].sum())
        with self._state:
            self._admitted_slots -= int(slots.size)
            self._admitted_tokens -= tokens

    def _fail(self, slots: np.ndarray, exc: GazsiError) -> None:
        if not slots.size:
            return
        retry = float(getattr(exc, "retry_after", 0.0) or 0.0)
        for slot in slots.tolist():
            self.ring.write_error(slot, type(exc).__name__, exc.message, exc.param, retry)
        self._reply(slots)

    def _reply(self, slots: np.ndarray) -> None:
        """One write per worker (its indices, at most PIPE_BUF bytes each)."""
        ring = self.ring
        ring.meta[slots, M_T_REPLY] = time.monotonic_ns()
        workers = slots // ring.layout.slots_per_worker
        for w in np.unique(workers).tolist():
            mine = slots[workers == w].astype("<u4")
            for i in range(0, mine.size, _MAX_WRITE):
                with contextlib.suppress(OSError):  # a worker being restarted: its requests are gone
                    os.write(self.resp_fds[w], mine[i:i + _MAX_WRITE].tobytes())
