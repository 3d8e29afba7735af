"""The worker's side of the ring: an :class:`~edge_node.embedders.Embedder` that sends token ids to the node
process through shared memory and waits for the vectors.

Worker ``w`` owns ring slots ``[w*S, (w+1)*S)`` outright: it fills a free slot, writes the slot's index
into the node's request pipe (the slots of one event-loop turn in one write: on 2 cores with 2 workers
that took the node's batches from ~9 to ~60 slots, its CPU per request from 0.036 to 0.025 ms and
saturation from 7.4k to 8.8k req/s; issue 13), and the node's slot batcher writes the vectors back into
the slot and the index into this worker's response pipe. A request larger than one slot spans several, sent
``_WINDOW`` at a time within the request deadline (all of a GPU-plane burst's inputs arrive in one call).

When every slot of the worker is taken, a request waits for one, oldest first (a freed slot is handed
straight to the oldest waiter, so a newcomer never overtakes), for at most ``slot_wait_s`` and with at
most ``max_waiters`` waiting; past either it gets 429 with ``Retry-After``. It used to refuse at once:
with 64 slots per worker, 256 concurrent requests through the gateway to a one-worker edge got 7,018
429s of ~15,000 answers (docs/benchmarks.md); the gpu plane had the same 429 storm (issue 15).

The deadline is checked by one sweep while anything is in flight (every ``timeout / 20``, at most 1 s),
not by an ``asyncio.timeout`` per request: that one cost ~9 % of a worker's time in issue 13's
profile. A request past its deadline gets :class:`DeadlineExceeded` up to one sweep late; the slot
batcher drops its slot unrun (its deadline is in the ring too).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time

import numpy as np

from edge_node.embedders import Embedded, Timing
from edge_node.transports.fast.ring import (
    DOWN_MARKER,
    ENGINE_DRAINING,
    ENGINE_FAILED,
    ENGINE_LOADING,
    ENGINE_UP,
    M_BATCH,
    M_INFER_US,
    M_STATUS,
    M_T_FORMED,
    M_T_INFER0,
    M_T_INFER1,
    M_T_SUBMIT,
    M_T_WOKEN,
    SlotRing,
    pack_indices,
    unpack_indices,
)
from gazsi_cluster import errors as gz_errors
from gazsi_cluster.errors import DeadlineExceeded, InvalidRequest, Overloaded, ServiceUnavailable

__all__ = ["RingEmbedder"]

_Part = tuple[np.ndarray, int, int]  # vectors, batch size, inference us
_MAX_WRITE = 1024  # indices per write: 4 KiB, PIPE_BUF
# Slots one call fills at once: a 100-input call is one round trip to the engine, not four, and a call of
# thousands of inputs still leaves most of the worker's slots to the requests beside it.
_WINDOW = 4


class RingEmbedder:
    """``embed`` through this worker's ring slots; ``on_responses`` is fed from the response pipe."""

    def __init__(self, ring: SlotRing, worker: int, req_fd: int, timeout_s: float, *,
                 slot_wait_s: float = 0.5, max_waiters: int = 1024, flush_slots: int = 0) -> None:
        self.ring, self.worker, self.req_fd, self.timeout_s = ring, worker, req_fd, timeout_s
        self.slot_wait_s, self.max_waiters, self.flush_slots = slot_wait_s, max_waiters, flush_slots
        layout = ring.layout
        self.layout = layout
        first = worker * layout.slots_per_worker
        self._free: list[int] = list(range(first + layout.slots_per_worker - 1, first - 1, -1))
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._deadlines: dict[int, float] = {}  # slot -> time.monotonic() deadline, while in flight
        self._abandoned: set[int] = set()
        # Requests waiting for a slot, oldest first; a freed slot is the result of the oldest one's future.
        self._slot_queue: collections.deque[asyncio.Future[int]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._outbox: list[int] = []  # slots filled in this loop turn, written to the node at its end
        self._flush_scheduled = False
        self._tick = min(1.0, max(0.01, timeout_s / 20))

    # -- readiness -----------------------------------------------------------------------
    def check_ready(self) -> None:
        state = self.ring.state
        # Draining: the listeners take no new connections, but what they accepted is still served.
        if state in (ENGINE_UP, ENGINE_DRAINING):
            return
        if state == ENGINE_LOADING:
            raise ServiceUnavailable("the model is still loading", retry_after=5)
        if state == ENGINE_FAILED:
            raise ServiceUnavailable("the model failed to load on this node", retry_after=30)
        raise ServiceUnavailable("the engine is restarting", retry_after=1)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    # -- the response pipe ---------------------------------------------------------------
    def on_responses(self, data: bytes) -> None:
        """Slot indices answered by the node (or DOWN_MARKER: fail everything in flight)."""
        woken = time.monotonic_ns()
        meta = self.ring.meta
        for slot in unpack_indices(data):
            if slot == DOWN_MARKER:
                self.fail_all()
                continue
            if slot >= self.layout.slots:
                continue
            meta[slot, M_T_WOKEN] = woken
            if slot in self._abandoned:
                self._abandoned.discard(slot)
                self._release(slot)
                continue
            fut = self._waiting.pop(slot, None)
            if fut is not None and not fut.done():
                fut.set_result(slot)

    def fail_all(self) -> None:
        for slot in list(self._abandoned):
            self._release(slot)
        self._abandoned.clear()
        waiting, self._waiting = self._waiting, {}
        queued, self._slot_queue = self._slot_queue, collections.deque()
        for fut in [*waiting.values(), *queued]:
            if not fut.done():
                fut.set_exception(ServiceUnavailable("the engine stopped; retry shortly", retry_after=1))

    def _release(self, slot: int) -> None:
        while self._slot_queue:  # hand it to the oldest request still waiting
            fut = self._slot_queue.popleft()
            if not fut.done():
                fut.set_result(slot)
                return
        self._free.append(slot)

    @property
    def slot_waiters(self) -> int:
        return len(self._slot_queue)

    # -- embedding -----------------------------------------------------------------------
    def _chunks(self, seqs: list[np.ndarray]) -> list[list[np.ndarray]]:
        lay = self.layout
        chunks: list[list[np.ndarray]] = [[]]
        tokens = 0
        for seq in seqs:
            if len(seq) > lay.slot_tokens:
                raise InvalidRequest("an input is longer than a ring slot holds", param="input")
            if len(chunks[-1]) >= lay.slot_inputs or tokens + len(seq) > lay.slot_tokens:
                chunks.append([])
                tokens = 0
            chunks[-1].append(seq)
            tokens += len(seq)
        return chunks

    async def embed(self, seqs: list[np.ndarray], timing: Timing, *, use_cache: bool = True) -> Embedded:
        self.check_ready()
        deadline = time.monotonic() + self.timeout_s
        timing.queued = time.perf_counter()
        if len(seqs) == 1 and len(seqs[0]) <= self.layout.slot_tokens:  # one input: one chunk
            vectors, batch, infer_us = await self._run_chunk(seqs, deadline, True, timing)
            return Embedded(vectors, batch, infer_us)
        chunks = self._chunks(seqs)
        if len(chunks) == 1:
            vectors, batch, infer_us = await self._run_chunk(chunks[0], deadline, True, timing)
            return Embedded(vectors, batch, infer_us)
        # A window of slots at a time, bounded by the deadline; only the first slot may be refused as busy (429),
        # the others of an admitted call wait for a slot until the deadline. A task group: one chunk's failure
        # cancels its siblings (their slots go back), and the first error is the call's.
        parts: list[_Part] = []
        for w in range(0, len(chunks), _WINDOW):
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._run_chunk(chunk, deadline, w + j == 0, timing))
                             for j, chunk in enumerate(chunks[w:w + _WINDOW])]
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None
            parts += [t.result() for t in tasks]
        return Embedded(np.concatenate([p[0] for p in parts]), max(p[1] for p in parts), max(p[2] for p in parts))

    def _flush_turn(self) -> None:
        self._flush_scheduled = False
        if self._outbox:
            self._flush()

    def _flush(self) -> None:
        """Send every slot submitted in this loop turn in one write (at most PIPE_BUF each, so atomic among
        the workers sharing the pipe): one system call and one wake-up of the node per turn, not per slot."""
        slots, self._outbox = self._outbox, []
        for i in range(0, len(slots), _MAX_WRITE):
            part = slots[i:i + _MAX_WRITE]
            try:
                os.write(self.req_fd, pack_indices(part))
            except OSError:
                for slot in part:
                    # The waiting request sees the error and frees its slot (it was never sent).
                    fut = self._waiting.pop(slot, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(ServiceUnavailable("the engine is restarting", retry_after=1))

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"no result within the {self.timeout_s:g}s request deadline")

    def _sweep(self) -> None:
        """Fail what is past its deadline; re-armed while anything is in flight."""
        now = time.monotonic()
        for slot, fut in list(self._waiting.items()):
            if self._deadlines.get(slot, now) <= now and not fut.done():
                fut.set_exception(self._late())
        self._sweeper = None
        if self._waiting:
            self._sweeper = asyncio.get_running_loop().call_later(self._tick, self._sweep)

    async def _queue_for_slot(self, deadline: float, first: bool) -> int:
        """Wait, oldest first, for one of this worker's slots. A request's first chunk waits at most
        ``slot_wait_s`` (then 429: the worker is saturated); a later chunk of an admitted request waits
        until the request's deadline (then 504)."""
        if first and len(self._slot_queue) >= self.max_waiters:
            raise self._busy()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._slot_queue.append(fut)
        limit = min(deadline, time.monotonic() + self.slot_wait_s) if first else deadline

        def expire() -> None:
            if not fut.done():
                fut.set_exception(self._busy() if first else self._late())

        timer = loop.call_at(loop.time() + max(0.0, limit - time.monotonic()), expire)
        try:
            slot = await fut
        except BaseException:
            timer.cancel()
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())  # the client left just as a slot came: the next waiter's
            with contextlib.suppress(ValueError):
                self._slot_queue.remove(fut)  # timed out or cancelled: no longer counts as waiting
            raise
        timer.cancel()
        try:
            self.check_ready()  # the engine may have gone while this request waited
        except BaseException:
            self._release(slot)
            raise
        return slot

    def _busy(self) -> Overloaded:
        return Overloaded("The edge node is at capacity; retry shortly.", retry_after=1.0,
                          queued=self.layout.slots_per_worker + len(self._slot_queue),
                          limit=self.layout.slots_per_worker)

    async def _run_chunk(self, chunk: list[np.ndarray], deadline: float, first: bool, timing: Timing) -> _Part:
        if self._free and not self._slot_queue:
            slot = self._free.pop()
        else:  # a newcomer queues behind those already waiting
            slot = await self._queue_for_slot(deadline, first)
        ring = self.ring
        ring.write_request(slot, chunk, deadline)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._waiting[slot] = fut
        self._deadlines[slot] = deadline
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._tick, self._sweep)
        ring.meta[slot, M_T_SUBMIT] = time.monotonic_ns()
        outbox = self._outbox
        outbox.append(slot)
        if len(outbox) >= self.flush_slots > 0:
            self._flush()  # a scheduled end-of-turn flush then finds the rest (or nothing)
        elif not self._flush_scheduled:
            # Only when the slot waits for the turn's end: with a write per slot (flush_slots=1, the
            # H200's default) a call_soon per request only to find an empty outbox cost ~4 % of a worker.
            self._flush_scheduled = True
            loop.call_soon(self._flush_turn)
        try:
            await fut
        except BaseException:
            if self._waiting.pop(slot, None) is not None:
                # The client left (or the deadline passed): a zero deadline is the cancel signal the
                # slot batcher honours before running a slot (rule 4); its answer frees the slot.
                ring.deadline[slot] = 0.0
                self._abandoned.add(slot)
            elif not fut.done() or fut.exception() is not None:
                self._release(slot)
            raise
        try:
            # One copy of the slot's meta words as ints: six numpy scalar reads cost more than the copy.
            meta = ring.meta[slot].tolist()
            if meta[M_STATUS] != 1:
                kind, param, message, retry = ring.read_error(slot)
                cls = getattr(gz_errors, kind, gz_errors.EngineError)
                if not (isinstance(cls, type) and issubclass(cls, gz_errors.GazsiError)):
                    cls = gz_errors.EngineError
                if issubclass(cls, gz_errors._RetryableError):
                    raise cls(message, param=param, retry_after=retry)
                raise cls(message, param=param)
            # One clock (CLOCK_MONOTONIC) for perf_counter and the ring's stamps: Server-Timing works here too.
            timing.formed = meta[M_T_FORMED] / 1e9
            timing.infer_start, timing.infer_end = meta[M_T_INFER0] / 1e9, meta[M_T_INFER1] / 1e9
            return np.array(ring.vectors[slot, : len(chunk)]), meta[M_BATCH], meta[M_INFER_US]
        finally:
            self._release(slot)
