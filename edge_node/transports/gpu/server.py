"""The gpu data plane: host socket feed -> parse kernel -> ring -> pipeline -> answer -> sockets.

Every request reaches the node's one pipeline (:class:`~edge_node.pipeline.EdgePipeline`), so routes,
auth, limits, readiness, the response cache, usage, metrics and errors are those of every transport.
What the kernels add is speed on GAZSI's hot path:

* ``GET``/``HEAD /inference?d=`` with a valid ``d`` and no body: parsed by ``gz_parse``, admitted to a
  ring slot by ``gz_ring_admit``, handed with the rest of its burst to
  :meth:`EdgePipeline.handle_inference_many` (per request authorise -> limits -> readiness -> tokenise ->
  embed -> usage, the encode stage aside; one tokenizer call and one embed call for the burst, one task
  for it in this loop), then answered: by default (``edge.gpu_build: cpu``) rendered here at once by
  :func:`edge_node.encode.inference_body` and the one renderer, the slot freed without a second GPU round
  trip (measured faster, docs/gpunetio.md); with ``edge.gpu_build: gpu`` built by ``gz_ring_build`` into
  those same bytes, the headers the pipeline adds (rate limits, ``X-Gazsi-Cache``, ``Server-Timing``)
  spliced in where the renderer puts them. An error, or a peer's answer after forwarding, is rendered on
  the CPU.
* ``GET``/``HEAD /index.`` and ``/contacts.``: canned pages built by ``gz_build``, the same bytes.
* Everything else (``POST /v1/embeddings``, ``/v1/models``, ``/healthz``, ``/readyz``, unknown routes,
  every status the kernel would refuse with, heads too large for a kernel slot, requests with a body,
  and the odd query Python would read differently): the CPU parses the head with the configured
  limits (:func:`._head.parse_head`), reads the body, and calls :meth:`EdgePipeline.handle`, as the
  fast front's workers do. The kernels never answer an error of their own, so every refusal carries
  the same bytes as on the other transports.

Admission holds load instead of refusing it: a hot ``/inference`` that finds all 128 ring slots taken
waits (a heap by arrival, oldest first back into the next burst as slots free) for up to
``edge.gpu_slot_wait_s``, then gets 429 with ``Retry-After``; heads waiting for a burst or a slot are
bounded together by ``edge.gpu_queue_capacity`` (past it: 429 at once). It used to refuse at once when
the ring was full, so load turned into 429 storms (issue 15).

Control flow is mode (a), one kernel launch per burst (it won every burst size measured, see
docs/benchmarks.md). A burst is whatever heads arrived while the previous one was on the GPU, up to
``capacity``: the loops wait for the device off the event loop (:class:`.waits.GpuWaits`), so framing
heads, the pipeline and the socket writes go on meanwhile.
The feed applies the listener limits (``settings.limits``); :meth:`GpuDataplane.stop` drains as the
listener does (idle connections close at once, requests in service are answered, then their connections
close). The operator routes (``/metrics``, ``/admin``) are on the node's operator port. Refused at start:
TLS (the kernels speak plaintext HTTP; :mod:`.transport`), and request bodies in chunked transfer coding
(400: send ``Content-Length``).

Beside it: :mod:`.cpu_path` (what the CPU parses and every reply the renderer writes), :mod:`.admission`
(heads waiting for a ring slot), :mod:`.waits` (waiting for the GPU), :mod:`.stages` (the T0..T8 table),
:mod:`.transport` (the plane in the node process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gazsi_cluster.errors import EngineError, Overloaded
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import HttpReply, HttpRequest, render

from . import _layout as L
from ._head import hot_headers, needs_cpu_query
from .admission import SlotWaiters
from .cpu_path import error_response, reply_whole, send, serve_cpu, with_headers
from .device import cuda_device
from .feed import FeedConnection, FeedLimits
from .stages import StageTable
from .waits import GpuWaits

if TYPE_CHECKING:
    from edge_node.pipeline import EdgePipeline, GazsiResult
    from gazsi_cluster.config import LimitsConfig, Settings

    from .device import HttpDevice
    from .ring import HostRing

__all__ = ["GpuDataplane"]

log = logging.getLogger(__name__)

_SMALL = 4  # heads in a burst (results in a build) that gpu_poll_us polls for: the low-load regime
_NO_SLOT = -2  # gz_ring_admit's R_SLOT when every ring slot is taken (-3: a queue misbehaved, -1: not admitted)
_PAGES = {L.ROUTE_INDEX: "/index.", L.ROUTE_CONTACTS: "/contacts."}
_Burst = list[tuple[FeedConnection, bytes, int]]


def _authorization(head: bytes, row: Sequence[int]) -> str | None:
    """The Authorization value where the parse kernel found it."""
    n = int(row[L.R_AUTH_LEN])
    if n < 0:
        return None
    off = int(row[L.R_AUTH_OFF])
    return head[off:off + n].decode("latin-1")


class GpuDataplane:
    """Owns the device, the ring and the two loops (bursts, builds). :meth:`start`, then :meth:`serve`.

    ``device`` makes the :class:`~edge_node.transports.gpu.device.HttpDevice` (the CUDA kernels unless
    a test hands it their CPU reference).
    """

    def __init__(self, pipeline: EdgePipeline, *, capacity: int = 1024, max_pending: int = 4096,
                 slot_wait_s: float = 0.5, retry_after_s: float = 1.0, poll_us: int = 0, build: str = "cpu",
                 limits: FeedLimits | None = None, device: Callable[[int], HttpDevice] | None = None) -> None:
        self.pipeline = pipeline
        self.capacity = capacity
        self.max_pending = max_pending  # heads waiting for a burst or a ring slot, together
        self.slot_wait_s = slot_wait_s
        self.retry_after_s = retry_after_s
        self.cpu_build = build == "cpu"  # edge.gpu_build: /inference answers rendered here, no build kernel
        self.limits = limits or FeedLimits()
        self.per_client: Counter[str] = Counter()
        self.connections: weakref.WeakSet[FeedConnection] = weakref.WeakSet()
        self._make_device = device or cuda_device()
        self.device: HttpDevice | None = None
        self._pending: _Burst = []
        self._bursting = 0  # heads of the burst on the GPU now (stop drains on them too)
        self._waiting = SlotWaiters(slot_wait_s)  # hot /inference heads that found every ring slot taken
        self._work = asyncio.Event()
        self._build = asyncio.Event()
        self._to_build = 0
        self._quiet = asyncio.Event()  # set when nothing is in service (stop drains on it)
        self._slot_conn: dict[int, tuple[FeedConnection, bool, list[tuple[str, str]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None
        self.stats = {"bursts": 0, "requests": 0, "ring_full": 0, "waited": 0, "expired": 0, "queue_full": 0,
                      "built": 0, "builds": 0, "cpu": 0, "gpu_waits": 0, "gpu_waits_off_loop": 0,
                      "gpu_wait_us": 0, "gpu_resume_us": 0}
        self.waits = GpuWaits(self.stats, poll_us)  # edge.gpu_poll_us: a small burst's wait polled first
        self.stages = StageTable()  # T0..T8 of the recent slots: /readyz, sent to the node each second

    @classmethod
    def from_settings(cls, pipeline: EdgePipeline, settings: Settings, limits: LimitsConfig,
                      device: Callable[[int], HttpDevice] | None = None) -> GpuDataplane:
        """The plane as ``settings.edge`` declares it, the listener limits ``limits`` (a feed's share)."""
        edge = settings.edge
        return cls(pipeline, limits=FeedLimits.from_config(limits), max_pending=edge.gpu_queue_capacity,
                   slot_wait_s=edge.gpu_slot_wait_s, retry_after_s=settings.limits.retry_after_s,
                   poll_us=edge.gpu_poll_us, build=edge.gpu_build,
                   device=device or cuda_device(edge.gpu_sync, edge.gpu_stream_priority, edge.gpu_zero_copy))

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Make the device (GPU buffers, mapped ring, compiled kernels), start the loops."""
        self.device = self._make_device(self.capacity)
        self.waits.start()
        self._loops = [asyncio.create_task(self._burst_loop(), name="gazsi-gpu-bursts"),
                       asyncio.create_task(self._build_loop(), name="gazsi-gpu-builds")]

    @property
    def ring(self) -> HostRing:
        assert self.device is not None
        return self.device.ring

    async def serve(self, host: str | None = None, port: int | None = None, *,
                    sock: socket.socket | None = None) -> asyncio.Server:
        """Listen on ``host:port``, or on ``sock`` (a feed process's share of the node's SO_REUSEPORT port)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(self._connection, sock=sock, backlog=4096)
        else:
            self.server = await loop.create_server(self._connection, host, port or 0, backlog=4096)
        return self.server

    def _connection(self) -> FeedConnection:
        conn = FeedConnection(self, self.limits, self.per_client)
        self.connections.add(conn)
        return conn

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting and drain, as the other listeners do: idle connections close now, requests in
        service are answered (bounded by ``timeout_s``) and their connections close; then the device is freed."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.drain()
        self._check_quiet()
        with contextlib.suppress(TimeoutError):  # heads still to burst, CPU work, results waiting for their build
            await asyncio.wait_for(self._quiet.wait(), timeout_s)
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for conn in list(self.connections):  # what did not finish in time
            conn.close()
        self.waits.stop()
        if self.device is not None:
            self.device.close()
            self.device = None

    # -- the feed's sink ------------------------------------------------------------------
    def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
        lim = conn.limits
        if len(head) > min(L.REQ_STRIDE, lim.max_header_bytes) or (
                lim.max_headers < L.MAX_HEADERS and head.count(b"\r\n") - 2 > lim.max_headers):
            # Past a kernel slot, or perhaps past the configured limits: the CPU parse counts and decides.
            self._to_cpu(conn, head, t0_ns)
            return
        if len(self._pending) + len(self._waiting) >= self.max_pending:
            # Not parsed yet, so whether the client wants keep-alive is unknown: close, as HTTP allows.
            self.stats["queue_full"] += 1
            conn.respond(error_response(self._overloaded("the GPU data plane's queue is full"), False), False)
            return
        self._pending.append((conn, head, t0_ns))
        self._quiet.clear()
        self._work.set()

    def _overloaded(self, why: str) -> Overloaded:
        return Overloaded(why, retry_after=self.retry_after_s)

    def _wait_for_slot(self, conn: FeedConnection, head: bytes, t0_ns: int, keep: bool) -> None:
        self.stats["ring_full"] += 1
        self._waiting.add(t0_ns, conn, head, keep)

    def _admit_waiting(self) -> None:
        """Expire what waited too long (429), then put the oldest waiting heads before the new ones, as many as
        there are free slots (more would only be parsed again)."""
        if not self._waiting:
            return
        for t0, conn, keep in self._waiting.expired(time.perf_counter_ns()):
            self.stats["expired"] += 1
            reply = error_reply(self._overloaded(f"no GPU ring slot came free within {self.slot_wait_s:g} s"))
            self.pipeline.metrics.observe("/inference", reply.status, time.perf_counter() - t0 / 1e9)
            keep = keep and not conn.draining
            conn.respond(render(reply, keep_alive=keep), keep)
        back = self._waiting.oldest(self.ring.free_count() if self.device is not None else 0)
        if back:
            self.stats["waited"] += len(back)
            self._pending[:0] = back

    def _slot_freed(self) -> None:
        if self._waiting:
            self._work.set()

    # -- bursts: parse + admit ------------------------------------------------------------
    async def _burst_loop(self) -> None:
        while True:
            if self._waiting:  # wake for the oldest one's deadline even if no slot frees
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), self.slot_wait_s / 4)
            else:
                await self._work.wait()
            self._work.clear()
            self._admit_waiting()
            while self._pending:
                burst, self._pending = self._pending[: self.capacity], self._pending[self.capacity:]
                try:
                    await self._run_burst(burst)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a GPU failure answers this burst, it does not kill the loop
                    log.exception("GPU burst failed")
                    for conn, _, _ in burst:
                        if conn.busy and conn.task is None:
                            conn.respond(error_response(EngineError("GPU data plane failure"), False), False)
            self._check_quiet()
            await asyncio.sleep(0)  # let the next turn's heads arrive before the next burst

    async def _run_burst(self, burst: _Burst) -> None:
        assert self.device is not None
        t1 = time.perf_counter_ns()
        self._bursting = len(burst)
        try:
            rows = await self.waits.result(self.device.launch_parse_admit([head for _, head, _ in burst]),
                                   small=len(burst) <= _SMALL)
        finally:
            self._bursting = 0
        self.stats["bursts"] += 1
        self.stats["requests"] += len(burst)
        canned: list[int] = []
        admitted: dict[int, tuple[int, bool]] = {}
        hot_heads: dict[int, dict[str, str]] = {}
        table: list[list[int]] = rows.tolist()  # Python ints: a numpy scalar read per field cost more
        for i, (conn, head, t0) in enumerate(burst):
            row = table[i]
            status, route, slot = int(row[L.R_STATUS]), int(row[L.R_ROUTE]), int(row[L.R_SLOT])
            hot = status == 200 and int(row[L.R_CLEN]) <= 0
            if hot:
                headers = hot_headers(head, _authorization(head, row))
                hot = "upgrade" not in headers
                if hot and route == L.ROUTE_INFERENCE:
                    q0 = int(row[L.R_QUERY_OFF])
                    hot = not needs_cpu_query(head[q0:q0 + int(row[L.R_QUERY_LEN])])
                hot_heads[i] = headers
            if slot >= 0:
                admitted[slot] = (i, hot)
            elif hot and route in _PAGES:
                canned.append(i)
            else:
                if hot and slot == _NO_SLOT:  # a valid /inference without a free slot: it waits for one
                    self._wait_for_slot(conn, head, t0, bool(row[L.R_KEEPALIVE]))
                    continue
                if slot == -3:
                    log.error("ring: admission failed (a queue misbehaved)")
                self._to_cpu(conn, head, t0)
        if canned:
            self._answer_canned(burst, rows, canned)
        served: list[tuple[int, FeedConnection, HttpRequest, str, bool]] = []
        for slot in self.ring.pop_requests():
            entry = admitted.pop(slot, None)
            if entry is None:
                log.error("ring: slot %d on the request queue was not admitted in this burst", slot)
                continue
            i, is_hot = entry
            conn, head, t0 = burst[i]
            d = self.ring.take(slot)
            if not is_hot:
                self.ring.abort(slot)
                self._slot_freed()
                self._to_cpu(conn, head, t0)
                continue
            self.ring.stamp(slot, 0, t0)
            self.ring.stamp(slot, 1, t1)
            row = table[i]
            served.append((slot, conn, self._hot_request(conn, head, row, hot_heads[i], t0), d.decode("utf-8"),
                        bool(row[L.R_KEEPALIVE])))
        if served:
            # One task and one pipeline call for the burst's hot requests, not one each (issue 15). A client that
            # leaves withdraws its share; the task is cancelled (the batcher drops its inputs) once all have left.
            task = asyncio.get_running_loop().create_task(self._infer(served))
            self._tasks.add(task)
            self._quiet.clear()
            task.add_done_callback(self._task_done)
            task.add_done_callback(functools.partial(self._reclaim, served))
            share = _BurstShare(task, len(served))
            for _, conn, _, _, _ in served:
                conn.task = share
        if admitted:  # admitted on the GPU but not seen on the request queue: a ring bug
            log.error("ring: %d admitted slots missing from the request queue", len(admitted))
            for i, _ in admitted.values():
                burst[i][0].respond(error_response(EngineError("ring failure"), False), False)

    def _answer_canned(self, burst: _Burst, rows: np.ndarray, idx: list[int]) -> None:
        from .kernels import jobs_for

        assert self.device is not None
        picked = rows[idx]
        zeros = [0] * len(idx)
        jobs = jobs_for(picked, zeros, zeros, zeros)
        responses = self.device.build_canned(jobs)
        now = time.perf_counter()
        for k, i in enumerate(idx):
            conn, _, t0 = burst[i]
            self.pipeline.metrics.observe(_PAGES[int(picked[k, L.R_ROUTE])], 200, now - t0 / 1e9)
            conn.respond(responses[k], bool(jobs[k, L.J_KEEPALIVE]))

    @staticmethod
    def _hot_request(conn: FeedConnection, head: bytes, row: Sequence[int], headers: dict[str, str],
                     t0_ns: int) -> HttpRequest:
        q0 = int(row[L.R_QUERY_OFF])
        query = head[q0:q0 + int(row[L.R_QUERY_LEN])].decode("latin-1")
        return HttpRequest("HEAD" if int(row[L.R_METHOD]) == 2 else "GET", "/inference", query, headers, b"",
                           conn.client, t0_ns / 1e9)

    def _spawn(self, conn: FeedConnection, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        conn.task = task
        self._tasks.add(task)
        self._quiet.clear()
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._check_quiet()

    def _check_quiet(self) -> None:
        if not (self._pending or self._bursting or self._waiting or self._tasks or self._slot_conn):
            self._quiet.set()

    def _to_cpu(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
        self.stats["cpu"] += 1
        self._spawn(conn, serve_cpu(self.pipeline, conn, head, t0_ns))

    # -- the CPU stage of the hot path: the pipeline, then back to the ring ---------------
    async def _infer(self, hot: list[tuple[int, FeedConnection, HttpRequest, str, bool]]) -> None:
        outcomes = await self.pipeline.handle_inference_many([h[2] for h in hot], [h[3] for h in hot])
        ring = self.ring
        done: list[tuple[int, GazsiResult]] = []
        for (slot, conn, request, _, keep), outcome in zip(hot, outcomes, strict=True):
            if isinstance(outcome, HttpReply) or conn.closed:  # an error or a peer's answer; or nobody to send to
                ring.abort(slot)
                self._slot_freed()
                if isinstance(outcome, HttpReply):
                    await send(conn, request, outcome, keep)
                continue
            if self.cpu_build:
                self._answer_on_cpu(slot, conn, request, outcome, keep)
                continue
            self._slot_conn[slot] = (conn, keep, outcome.headers)
            done.append((slot, outcome))
        if self.cpu_build:
            self._slot_freed()
            return
        if done:
            ring.complete_many([d[0] for d in done], tokens=[d[1].tokens for d in done],
                               batch_sizes=[d[1].batch_size for d in done],
                               inference_us=[d[1].inference_us for d in done],
                               samples=np.stack([d[1].sample for d in done]),
                               infer_marks=[d[1].marks for d in done])
            self._to_build += len(done)
            self._build.set()

    def _answer_on_cpu(self, slot: int, conn: FeedConnection, request: HttpRequest, r: GazsiResult,
                       keep: bool) -> None:
        """``edge.gpu_build: cpu``: the pipeline's renderer writes the response (the bytes every other transport
        sends) and the slot is freed here, without the build kernel's GPU round trip; T4/T5 and T7 still stamped."""
        ring = self.ring
        ring.stamp_inference([slot], [r.marks])
        ring.v.ts[slot, 6] = 0  # T6 is the build kernel's: none
        reply_whole(conn, request, r.reply(), keep)
        self.stages.finish(ring, slot, ring.abort)

    def _reclaim(self, hot: list[tuple[int, FeedConnection, HttpRequest, str, bool]], task: asyncio.Task[None]) -> None:
        # Cancelled (stop) or failed (a bug) before its slots were completed: slots still PROCESSING go back,
        # and after a failure their clients get the generic 500 instead of waiting for nothing.
        if self.device is None or not (task.cancelled() or task.exception() is not None):
            return
        failed = not task.cancelled()
        if failed:
            log.error("GPU data plane: a burst's pipeline failed", exc_info=task.exception())
        for slot, conn, _, _, _ in hot:
            if int(self.ring.v.state[slot]) == L.S_PROCESSING:
                self._slot_conn.pop(slot, None)
                self.ring.abort(slot)
                self._slot_freed()
                if failed:
                    conn.respond(error_response(EngineError("GPU data plane failure"), False), False)

    # -- builds ---------------------------------------------------------------------------
    async def _build_loop(self) -> None:
        while True:
            await self._build.wait()
            self._build.clear()
            await asyncio.sleep(0)  # results finishing in this turn share one launch
            k, self._to_build = self._to_build, 0
            if not k or self.device is None:
                continue
            # Results finishing while this build is on the GPU wait for the next one (they set _build).
            built = await self.waits.result(self.device.launch_build_ring(k), small=k <= _SMALL)
            self.stats["built"] += k
            self.stats["builds"] += 1
            for slot in built:
                if slot < 0:
                    log.error("ring: build kernel found no response to build")
                    continue
                data = self.ring.response(slot)
                conn, keep, headers = self._slot_conn.pop(slot)
                self.stages.finish(self.ring, slot, self.ring.release)
                conn.respond(with_headers(data, headers), keep)
            self._slot_freed()
            self._check_quiet()


class _BurstShare:
    """A hot request's part in its burst's pipeline task (:class:`.feed.Work`): a client that leaves cancels
    its share, and the last one to leave cancels the task."""

    __slots__ = ("left", "task")

    def __init__(self, task: asyncio.Task[None], n: int) -> None:
        self.task, self.left = task, n

    def done(self) -> bool:
        return self.task.done()

    def cancel(self) -> bool:
        self.left -= 1
        return self.task.cancel() if self.left <= 0 else False
