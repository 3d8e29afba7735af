"""The ``gpu`` data plane: host socket feed → parse kernel → ring → batcher → ring → build kernel → sockets.

Serves GAZSI's hot path: ``GET /inference?d=``, ``/index.``, ``/contacts.`` and the kernel's
error statuses (404, 405, 400, 413, 414, 431). Control flow is mode (a), one kernel launch per
burst (it won every burst size on the H100, see docs/benchmarks.md). A burst is whatever heads
arrived during one event-loop turn, up to ``capacity``. The OpenAI API, ``/readyz``,
``/metrics`` and the admin routes stay on the FastAPI app, served by :func:`serve_gpu` on
``edge.api_port`` (default port + 1): they need JSON bodies, validation and auth flows the GPU
path has no reason to duplicate, and they are not the hot path.

CPU work per request is what the kernels cannot do: authorisation, tokenising and batching
through :class:`~edge_node.service.EmbeddingService` (``embed``, so the response cache behaves
as on the socket path). Errors the service raises are answered from the CPU through the one
error mapping (:func:`gazsi_cluster.http.errors.to_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from http import HTTPStatus
from importlib import resources
from typing import Any

import numpy as np

from edge_node.service import Timing
from gazsi_cluster.errors import EngineError, Overloaded, ServiceUnavailable

from . import _layout as L
from .feed import FeedConnection, FeedLimits
from .ring import HostRing

__all__ = ["GpuDataplane", "serve_gpu"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _ring_module() -> Any:
    import cupy as cp

    pkg = resources.files(__package__)
    src = pkg.joinpath("http_kernels.cu").read_text() + "\n" + pkg.joinpath("ring.cu").read_text()
    return cp.RawModule(code=src, options=("--std=c++17",))


def http_response(status: int, body: bytes, headers: dict[str, str], keep_alive: bool) -> bytes:
    """A CPU-built response (errors from the service), shaped like the kernel's."""
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    lines = [f"HTTP/1.1 {status} {reason}", "server: gazsi-gpu", "content-type: application/json"]
    lines += [f"{k.lower()}: {v}" for k, v in headers.items() if k.lower() not in ("content-type", "content-length")]
    lines += [f"content-length: {len(body)}", f"connection: {'keep-alive' if keep_alive else 'close'}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_response(exc: BaseException, keep_alive: bool) -> bytes:
    from gazsi_cluster.http.asgi import to_response

    resp = to_response(exc)
    return http_response(resp.status_code, bytes(resp.body), dict(resp.headers), keep_alive)


class GpuDataplane:
    """Owns the GPU buffers, the ring and the two loops (bursts, builds). Start, then :meth:`serve`."""

    def __init__(self, runtime: Any, *, capacity: int = 1024, max_pending: int = 4096,
                 limits: FeedLimits | None = None) -> None:
        self.runtime = runtime
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
        runtime = self.runtime
        try:
            service = runtime.service
            principal = await runtime.authorizer.authorize(auth, model=service.model_id)
            timing = Timing()
            outcome = await service.embed(d.decode("utf-8"), timing)
            await runtime.authorizer.record_usage(principal, model=service.model_id, tokens=outcome.prompt_tokens)
        except Exception as exc:
            self.ring.abort(slot)
            conn.respond(error_response(exc, keep), keep)
            return
        self.ring.complete(slot, tokens=outcome.prompt_tokens, batch_size=outcome.batch_size,
                           inference_us=outcome.inference_us, sample=outcome.vectors[0][:3].tolist(),
                           infer_marks=(timing.infer_start, timing.infer_end))
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


async def _serve_async(settings: Any, runtime: Any) -> None:
    import uvicorn

    from edge_node.dataplane.socket.app import create_app

    edge = settings.edge
    api_port = edge.api_port if edge.api_port is not None else (edge.port + 1 if edge.port else 0)
    await runtime.start()
    plane = GpuDataplane(runtime)
    plane.start()
    await plane.serve(edge.host, edge.port)
    api = uvicorn.Server(uvicorn.Config(create_app(runtime, manage_lifespan=False), host=edge.host, port=api_port,
                                        log_level=settings.log_level, access_log=False, timeout_keep_alive=30))
    print(f"gazsi edge (gpu data plane): GAZSI routes on http://{edge.host}:{plane.port}, "
          f"OpenAI API, /readyz and /metrics on http://{edge.host}:{api_port}")
    try:
        await api.serve()  # returns on SIGINT/SIGTERM (uvicorn installs the handlers)
    finally:
        await plane.stop()
        await runtime.stop()


def serve_gpu(settings: Any, runtime: Any) -> int:
    """Run the ``gpu`` data plane until interrupted (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_async(settings, runtime))
    else:
        uvloop.run(_serve_async(settings, runtime))
    return 0
