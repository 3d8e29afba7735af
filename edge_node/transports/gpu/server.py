"""The ``gpu`` transport: host socket feed -> parse kernel -> ring -> pipeline -> ring -> build kernel -> sockets.

GAZSI's hot path: ``GET /inference?d=``, ``/index.``, ``/contacts.`` and the kernel's error statuses
(404, 405, 400, 413, 414, 431) are parsed and answered by CUDA kernels; control flow is mode (a), one
kernel launch per burst (it won every burst size measured, see docs/benchmarks.md). A burst is whatever
heads arrived during one event-loop turn, up to ``capacity``. The operator routes (``/readyz``,
``/metrics``, ``/admin``) are on the node's operator port.

The CPU does what the kernels cannot: the pipeline's authorise -> tokenise -> embed -> usage stages
(:meth:`edge_node.pipeline.EdgePipeline.gazsi`, so limits, the response cache and usage behave as on
every other transport), then the build kernel encodes the same body bytes as
:func:`edge_node.encode.inference_body`. Errors the pipeline raises are answered from the CPU through
the one error mapping and the one renderer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from gazsi_cluster.errors import ConfigError, EngineError, Overloaded, ServiceUnavailable
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import HttpRequest, render

from . import _layout as L
from .feed import FeedConnection, FeedLimits
from .ring import HostRing

if TYPE_CHECKING:
    from edge_node.node import EdgeNode
    from edge_node.pipeline import EdgePipeline

__all__ = ["GpuDataplane", "GpuTransport"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _ring_module() -> Any:
    import cupy as cp

    pkg = resources.files(__package__)
    src = pkg.joinpath("http_kernels.cu").read_text() + "\n" + pkg.joinpath("ring.cu").read_text()
    return cp.RawModule(code=src, options=("--std=c++17",))


def error_response(exc: BaseException, keep_alive: bool) -> bytes:
    return render(error_reply(exc), keep_alive=keep_alive)


class GpuDataplane:
    """Owns the GPU buffers, the ring and the two loops (bursts, builds). Start, then :meth:`serve`."""

    def __init__(self, pipeline: EdgePipeline, *, capacity: int = 1024, max_pending: int = 4096,
                 limits: FeedLimits | None = None) -> None:
        self.pipeline = pipeline
        self.capacity = capacity
        self.max_pending = max_pending
        self.limits = limits or FeedLimits()
        self._pending: list[tuple[FeedConnection, bytes, int]] = []
        self._work = asyncio.Event()
        self._build = asyncio.Event()
        self._to_build = 0
        self._slot_conn: dict[int, tuple[FeedConnection, bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None
        self.stats = {"bursts": 0, "requests": 0, "ring_full": 0, "built": 0}
        self.recent_marks: list[np.ndarray] = []  # T0..T8 of recent slots (bounded), for benchmarks

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Allocate GPU buffers and the mapped ring, compile kernels, start the loops."""
        import cupy as cp

        from .control import MappedBuffer
        from .kernels import GpuHttpEngine

        self.engine = GpuHttpEngine(self.capacity)
        self.ring_mem = MappedBuffer(L.RING_BYTES)
        self.ring = HostRing(self.ring_mem.array)
        self.d_ring = self.ring_mem.device_array(cp.uint8, (L.RING_BYTES,))
        mod = _ring_module()
        self.k_admit = mod.get_function("gz_ring_admit")
        self.k_build = mod.get_function("gz_ring_build")
        self.d_built = cp.full(L.RING_N, -1, dtype=cp.int32)
        self._loops = [asyncio.create_task(self._burst_loop(), name="gazsi-gpu-bursts"),
                       asyncio.create_task(self._build_loop(), name="gazsi-gpu-builds")]

    async def serve(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FeedConnection(self, self.limits), host, port, backlog=4096)
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if getattr(self, "ring_mem", None) is not None:
            import cupy as cp

            cp.cuda.Device().synchronize()  # no kernel may touch the ring once it is freed
            self.ring_mem.free()

    # -- the feed's sink ------------------------------------------------------------------
    def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
        if len(self._pending) >= self.max_pending:
            conn.respond(error_response(ServiceUnavailable("the GPU data plane is saturated", retry_after=1), False),
                         False)
            return
        self._pending.append((conn, head, t0_ns))
        self._work.set()

    # -- bursts: parse + admit ------------------------------------------------------------
    async def _burst_loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self._pending:
                burst, self._pending = self._pending[: self.capacity], self._pending[self.capacity:]
                try:
                    self._run_burst(burst)
                except Exception:  # a GPU failure answers this burst, it does not kill the loop
                    log.exception("GPU burst failed")
                    for conn, _, _ in burst:
                        if conn.busy:
                            conn.respond(error_response(EngineError("GPU data plane failure"), False), False)
            await asyncio.sleep(0)  # let the next turn's heads arrive before the next burst

    def _run_burst(self, burst: list[tuple[FeedConnection, bytes, int]]) -> None:
        eng = self.engine
        n = eng.load([head for _, head, _ in burst])
        t1 = time.perf_counter_ns()
        eng.upload(n)
        eng.launch_parse(n)
        self.k_admit(((n + 127) // 128,), (128,), (eng.d_results, eng.d_dbuf, np.int32(n), self.d_ring))
        results = eng.d_results[:n].get()  # synchronises: parse and admission are done
        self.stats["bursts"] += 1
        self.stats["requests"] += n
        canned: list[int] = []
        by_slot: dict[int, int] = {}
        for i, (conn, _head, _t0) in enumerate(burst):
            row = results[i]
            status, route, slot = int(row[L.R_STATUS]), int(row[L.R_ROUTE]), int(row[L.R_SLOT])
            keep = bool(row[L.R_KEEPALIVE])
            if status == 200:
                conn.skip_body(int(row[L.R_CLEN]))
            if status != 200 or route != L.ROUTE_INFERENCE:
                canned.append(i)
            elif slot >= 0:
                by_slot[slot] = i
            else:
                self.stats["ring_full"] += slot == -2
                exc = Overloaded("all ring slots are busy", retry_after=1) if slot == -2 else EngineError("ring failure")
                conn.respond(error_response(exc, keep), keep)
        if canned:
            self._answer_canned(burst, results, canned)
        for slot in self.ring.pop_requests():
            i = by_slot.pop(slot)
            conn, head, t0 = burst[i]
            row = results[i]
            d = self.ring.take(slot)
            self.ring.stamp(slot, 0, t0)
            self.ring.stamp(slot, 1, t1)
            auth = None
            if int(row[L.R_AUTH_LEN]) >= 0:
                off = int(row[L.R_AUTH_OFF])
                auth = head[off:off + int(row[L.R_AUTH_LEN])].decode("latin-1")
            task = asyncio.get_running_loop().create_task(self._infer(slot, conn, d, auth, bool(row[L.R_KEEPALIVE])))
            conn.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(self._reclaim, slot))
        if by_slot:  # admitted on the GPU but not seen on the request queue: a ring bug
            log.error("ring: %d admitted slots missing from the request queue", len(by_slot))
            for i in by_slot.values():
                burst[i][0].respond(error_response(EngineError("ring failure"), False), False)

    def _answer_canned(self, burst: list[tuple[FeedConnection, bytes, int]], results: np.ndarray,
                       idx: list[int]) -> None:
        from .kernels import jobs_for

        rows = results[idx]
        zeros = [0] * len(idx)
        jobs = jobs_for(rows, zeros, zeros, zeros)
        responses = self.engine.build(jobs, np.zeros((len(idx), 3), dtype=np.float32))
        for k, i in enumerate(idx):
            burst[i][0].respond(responses[k], bool(jobs[k, L.J_KEEPALIVE]))

    # -- the CPU stage: service, then hand back to the ring -------------------------------
    async def _infer(self, slot: int, conn: FeedConnection, d: bytes, auth: str | None, keep: bool) -> None:
        try:
            request = HttpRequest("GET", "/inference", "", {"authorization": auth} if auth is not None else {})
            result = await self.pipeline.gazsi(request, d.decode("utf-8"))
        except Exception as exc:
            self.ring.abort(slot)
            conn.respond(error_response(exc, keep), keep)
            return
        self.ring.complete(slot, tokens=result.tokens, batch_size=result.batch_size,
                           inference_us=result.inference_us, sample=result.sample.tolist(),
                           infer_marks=result.marks)
        self._slot_conn[slot] = (conn, keep)
        self._to_build += 1
        self._build.set()

    def _reclaim(self, slot: int, task: asyncio.Task[None]) -> None:
        # The client left and its task was cancelled, possibly before it ever ran (so no except
        # clause inside it could help): a slot still PROCESSING goes back, nothing is sent.
        if task.cancelled() and int(self.ring.v.state[slot]) == L.S_PROCESSING:
            self.ring.abort(slot)

    # -- builds ---------------------------------------------------------------------------
    async def _build_loop(self) -> None:
        eng = self.engine
        while True:
            await self._build.wait()
            self._build.clear()
            await asyncio.sleep(0)  # results finishing in this turn share one launch
            k, self._to_build = self._to_build, 0
            if not k:
                continue
            self.k_build(((k + 127) // 128,), (128,), (np.int32(k), self.d_ring, eng.d_canned, eng.d_canned_idx,
                                                         self.d_built))
            built = self.d_built[:k].get()
            self.stats["built"] += k
            for slot in built.tolist():
                if slot < 0:
                    log.error("ring: build kernel found no response to build")
                    continue
                data = self.ring.response(slot)
                conn, keep = self._slot_conn.pop(slot)
                self.ring.stamp(slot, 7)
                self.ring.release(slot)
                if len(self.recent_marks) < 100_000:
                    self.recent_marks.append(self.ring.v.ts[slot].copy())
                conn.respond(data, keep)


class GpuTransport:
    """The node's data plane on the GPU; refuses TLS (the kernels answer in plaintext) and says why."""

    name = "gpu"

    def __init__(self, node: EdgeNode) -> None:
        self.node = node
        self.plane: GpuDataplane | None = None
        self.port = 0
        if node.settings.edge.tls.enabled:
            raise ConfigError(
                "edge.tls is set but the gpu data plane cannot serve TLS: its CUDA kernels parse and build "
                "plaintext HTTP. Terminate TLS in front of the node, or use edge.dataplane=fast.")

    async def start(self) -> None:
        node, edge, limits = self.node, self.node.settings.edge, self.node.settings.limits
        assert node.pipeline is not None
        feed = FeedLimits(header_timeout_s=limits.header_timeout_s, keepalive_timeout_s=limits.keep_alive_timeout_s)
        self.plane = GpuDataplane(node.pipeline, limits=feed)
        self.plane.start()
        await self.plane.serve(edge.host, edge.port)
        self.port = self.plane.port

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.plane is not None:
            await self.plane.stop()

    async def wait_ready(self) -> None:
        """Serving as soon as :meth:`start` returned."""

    def check_health(self) -> None:
        if self.plane is None or self.plane.server is None or not self.plane.server.is_serving():
            raise ServiceUnavailable("the GPU data plane is not serving", retry_after=1)

    def readiness(self) -> dict[str, Any]:
        return {"gpu": dict(self.plane.stats) if self.plane is not None else None}

    @property
    def ready(self) -> bool:
        return self.plane is not None and self.plane.server is not None and self.plane.server.is_serving()
