"""The engine process of the fast front: owns the GPU, the batcher and the FastAPI admin app.

It runs the ordinary :class:`EdgeRuntime` and the ordinary FastAPI app (on ``admin_port``: /readyz,
/metrics, admin routes, and the full API for clients that want it), and additionally serves the
ring: slot indices arrive on the request pipe, their token ids go through the same batcher (and
response cache) as FastAPI requests, results are written back into the slot and the index into the
owning worker's response pipe. Response indices are flushed once per event-loop turn, one
``write`` per worker, so a batch of 64 finished requests costs a handful of syscalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import numpy as np

from edge_node.batcher import ItemResult
from edge_node.dataplane.fast.ring import (
    ENGINE_FAILED,
    ENGINE_UP,
    M_BATCH,
    M_CACHE,
    M_INFER_US,
    M_STATUS,
    SlotRing,
    pack_indices,
    unpack_indices,
)
from edge_node.dataplane.fast.slot_batcher import SlotBatcher
from edge_node.runtime import EdgeRuntime
from edge_node.service import EmbedOutcome, Timing
from gazsi_cluster.config import Settings
from gazsi_cluster.errors import GazsiError, ServiceUnavailable, _RetryableError

__all__ = ["RingServer", "engine_main"]

log = logging.getLogger(__name__)


class RingServer:
    """Feeds ring slots into ``runtime.service`` (batcher + cache) and answers through the pipes."""

    def __init__(self, runtime: EdgeRuntime, ring: SlotRing, req_fd: int, resp_fds: list[int], generation: int) -> None:
        self.runtime, self.ring = runtime, ring
        self.req_fd, self.resp_fds, self.generation = req_fd, resp_fds, generation
        self._outbox: dict[int, list[int]] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.slot_batcher: SlotBatcher | None = None
        self.served = 0

    async def run(self) -> None:
        """Wait for the model, mark the ring up, then serve until cancelled."""
        runtime = self.runtime
        try:
            await runtime.start(wait=True)
        except Exception:
            self.ring.set_state(ENGINE_FAILED)
            raise
        self.ring.set_created(runtime.created)
        self.ring.set_state(ENGINE_UP, generation=self.generation, pid=os.getpid())
        self._loop = asyncio.get_running_loop()
        if self._use_slots():
            await self._run_slots()
            return
        os.set_blocking(self.req_fd, False)
        self._loop.add_reader(self.req_fd, self._on_requests)
        try:
            await asyncio.Event().wait()
        finally:
            self._loop.remove_reader(self.req_fd)
            for task in list(self._tasks):
                task.cancel()

    def _use_slots(self) -> bool:
        """Round 2's slot batcher, unless configured off or the response cache needs the async path."""
        runtime = self.runtime
        return (runtime.settings.edge.ring_batcher == "slots" and runtime.response_cache is None
                and runtime.engine is not None)

    async def _run_slots(self) -> None:
        runtime = self.runtime
        engine = runtime.engine
        assert engine is not None
        batcher = SlotBatcher(self.ring, engine.embed, runtime.settings.batcher,
                              max_seq_len=runtime.service.tokenizer.max_seq_len, req_fd=self.req_fd,
                              resp_fds=self.resp_fds, generation=self.generation, observer=runtime.metrics)
        self.slot_batcher = batcher
        batcher.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(batcher.stop)

    def _on_requests(self) -> None:
        try:
            data = os.read(self.req_fd, 65536)
        except BlockingIOError:
            return
        ring, gen = self.ring, self.generation
        now = time.monotonic()
        for slot in unpack_indices(data):
            if slot >= ring.layout.slots or int(ring.meta[slot, 0]) != gen:
                continue  # left in the pipe by a previous engine generation
            if ring.deadline[slot] <= now:
                continue  # the worker has already answered 504 and will not read it
            if self.runtime.response_cache is None:
                self._submit(slot, now)
                continue
            task = asyncio.ensure_future(self._serve(slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _submit(self, slot: int, now: float) -> None:
        """Hot path without the response cache: straight into the batcher, completion by callback.

        The first version awaited ``embed_tokens`` in one task per slot; py-spy on the H100 showed
        the engine's event loop saturated at ~9k req/s, mostly in task creation, ``asyncio.timeout``
        and ``gather``. Callbacks on the batcher's futures do the same work without them; the
        batcher still enforces the deadline (rule 4) and admission (rule 1).
        """
        ring = self.ring
        try:
            service = self.runtime.service
            seqs = ring.read_request(slot)
            futures = service.batcher.submit(seqs, timeout_s=max(0.001, float(ring.deadline[slot]) - now))
        except GazsiError as exc:
            self._fail(slot, exc)
            return
        left = len(futures)

        def done(_f: asyncio.Future[ItemResult]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                self._complete(slot, futures)

        for fut in futures:
            fut.add_done_callback(done)

    def _complete(self, slot: int, futures: list[asyncio.Future[ItemResult]]) -> None:
        ring = self.ring
        vectors = ring.vectors[slot]
        batch = infer_us = 0
        for i, fut in enumerate(futures):
            if fut.cancelled():
                self._fail(slot, ServiceUnavailable("the edge node is shutting down"))
                return
            exc = fut.exception()
            if exc is not None:
                self._fail(slot, exc)
                return
            r = fut.result()
            vectors[i] = r.embedding
            batch = max(batch, r.batch.size)
            infer_us = max(infer_us, int((r.batch.infer_end - r.batch.infer_start) * 1e6))
        ring.meta[slot, M_BATCH] = batch
        ring.meta[slot, M_INFER_US] = infer_us
        ring.meta[slot, M_CACHE] = 0
        ring.meta[slot, M_STATUS] = 1
        self._reply(slot)

    def _fail(self, slot: int, exc: BaseException) -> None:
        if isinstance(exc, GazsiError):
            retry = exc.retry_after if isinstance(exc, _RetryableError) else 0.0
            self.ring.write_error(slot, type(exc).__name__, exc.message, exc.param, retry)
        else:
            log.error("ring slot failed: %r", exc)
            self.ring.write_error(slot, "EngineError", "inference failed for this batch", None, 0.0)
        self._reply(slot)

    async def _serve(self, slot: int) -> None:
        ring = self.ring
        try:
            seqs = ring.read_request(slot)
            outcome = await self._embed(seqs)
            ring.write_result(slot, outcome.vectors, outcome.batch_size, outcome.inference_us, outcome.cache)
        except asyncio.CancelledError:
            raise
        except GazsiError as exc:
            retry = exc.retry_after if isinstance(exc, _RetryableError) else 0.0
            ring.write_error(slot, type(exc).__name__, exc.message, exc.param, retry)
        except Exception as exc:  # never leak internals; the log keeps the stack
            log.exception("ring slot failed", exc_info=exc)
            ring.write_error(slot, "EngineError", "inference failed for this batch", None, 0.0)
        self._reply(slot)

    async def _embed(self, seqs: list[np.ndarray]) -> EmbedOutcome:
        """The part of ``EmbeddingService.embed`` after tokenising (the worker tokenised already)."""
        service = self.runtime.service
        timing = Timing()
        timing.tokenized = timing.received
        return await service.embed_cached(seqs, timing)

    def _reply(self, slot: int) -> None:
        self.served += 1
        self._outbox.setdefault(self.ring.layout.worker_of(slot), []).append(slot)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, {}
        for worker, slots in outbox.items():
            with contextlib.suppress(OSError):  # a worker being restarted: its requests are gone
                os.write(self.resp_fds[worker], pack_indices(slots))


def engine_main(settings: Settings, ring_name: str, layout: Any, req_fd: int, resp_fds: list[int],
                generation: int, admin_port: int) -> None:
    """Entry point of the engine process (forked by the supervisor)."""
    import uvicorn

    from edge_node.dataplane.socket.app import create_app
    from gazsi_cluster.auth.factory import authorizer_for as _authorizer

    ring = SlotRing.attach(layout, ring_name)
    runtime = EdgeRuntime(settings, authorizer=_authorizer(settings))
    app = create_app(runtime, manage_lifespan=False)
    config = uvicorn.Config(app, host=settings.edge.host, port=admin_port, log_level=settings.log_level,
                            access_log=False, lifespan="off", loop="uvloop")
    server = uvicorn.Server(config)
    ring_server = RingServer(runtime, ring, req_fd, resp_fds, generation)

    async def main() -> None:
        task = asyncio.create_task(ring_server.run(), name="gazsi-ring")
        try:
            await server.serve()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await runtime.stop(drain_timeout_s=2.0)

    import uvloop

    uvloop.run(main())
    ring.close()
