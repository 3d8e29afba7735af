"""The fast front, node side: the ring, the slot batcher on the engine, and N HTTP worker processes.

The node process owns the engine. It creates the shared-memory ring and the pipes, starts the workers
as fresh interpreters (``python -m <worker_module>``, named by the node: never forked, so nothing of a
Ray worker's or CUDA's state leaks into them) and hands each one its settings and file descriptors.
Each worker builds the same :class:`~edge_node.node.EdgeNode` in its worker role and serves the data
port with SO_REUSEPORT. The node serves the operator app on ``edge.admin_port``, restarts a worker
that dies (after the slot batcher let go of its slots), and tells every worker what changes at run
time over a control pipe: limits, the routing table, drain. Workers die with the node
(PR_SET_PDEATHSIG): nothing is left behind even after ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from edge_node.transports.fast.channel import MessageReader, send_message
from edge_node.transports.fast.ring import (
    DOWN_MARKER,
    ENGINE_DRAINING,
    ENGINE_FAILED,
    ENGINE_LOADING,
    ENGINE_UP,
    RingLayout,
    SlotRing,
    pack_indices,
)
from edge_node.transports.fast.slot_batcher import SlotBatcher
from gazsi_cluster.errors import ConfigError, ServiceUnavailable
from gazsi_cluster.http.listener import bind_socket

if TYPE_CHECKING:
    from edge_node.metrics import RequestMetrics
    from edge_node.transports.base import TransportHost

__all__ = ["FastTransport", "default_workers"]

log = logging.getLogger(__name__)

_GENERATION = 1  # one engine per node process: a node that loses its engine exits and is restarted whole


def default_workers() -> int:
    """All CPUs this process may use but two (the engine's threads), at least one, at most 64."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(64, cpus - 2))


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.resp_r, self.resp_w = os.pipe()
        self.ctrl_r, self.ctrl_w = os.pipe()
        self.ready = False
        self.restarts = 0

    def close(self) -> None:
        for fd in (self.resp_r, self.resp_w, self.ctrl_r, self.ctrl_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class FastTransport:
    """Start with :meth:`start` (listeners up, model may still be loading); stop with :meth:`stop`."""

    name = "fast"

    def __init__(self, node: TransportHost, *, worker_module: str, plane: str = "http") -> None:
        self.node = node
        self.worker_module = worker_module  # ``python -m`` this in each worker (the node's own entry point)
        # What each worker serves HTTP with: "http" (httptools) or "gpu" (feed processes of the gpu data plane).
        self.plane = plane
        if plane == "gpu":
            self.name = "gpu"
        edge = node.settings.edge
        self.workers = [_Worker(i) for i in range(edge.workers or default_workers())]
        self.layout = RingLayout(len(self.workers), edge.ring_slots_per_worker, edge.ring_slot_inputs,
                                 edge.ring_slot_tokens, node.spec.dimensions)
        self.ring: SlotRing | None = None
        self.batcher: SlotBatcher | None = None
        self.port = 0
        self.worker_metrics: list[RequestMetrics] = []  # each worker's cells in the ring (the node sums them)
        self._holder: Any = None
        self._req_r = self._req_w = self._status_r = self._status_w = -1
        self._status = MessageReader()
        self._tasks: set[asyncio.Task[None]] = set()
        self._table_version = -1
        self._stopping = False
        self._all_ready = asyncio.Event()
        self._up = asyncio.Event()
        self.planes: dict[int, dict[str, Any]] = {}  # gpu feed processes' latest reports, by worker

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        node, edge = self.node, self.node.settings.edge
        self._holder = bind_socket(edge.host, edge.port, reuse_port=True)
        self.port = int(self._holder.getsockname()[1])
        self.ring = SlotRing.create(self.layout)
        self.ring.set_state(ENGINE_LOADING, generation=_GENERATION)
        self.ring.set_created(node.created)
        self._req_r, self._req_w = os.pipe()
        self._status_r, self._status_w = os.pipe()
        os.set_blocking(self._status_r, False)
        asyncio.get_running_loop().add_reader(self._status_r, self._on_status)
        self.worker_metrics = [self.ring.worker_metrics(w.index) for w in self.workers]
        for worker in self.workers:
            self._spawn(worker)
        try:
            await asyncio.wait_for(self._all_ready.wait(), 120)
        except TimeoutError:
            raise ConfigError("the fast front's workers did not start within 120 s; see their log lines") from None
        self._spawn_task(self._serve_engine(), "gazsi-fast-engine")
        self._spawn_task(self._supervise(), "gazsi-fast-supervise")
        log.info("fast front: %d workers on %s:%d", len(self.workers), edge.host, self.port)

    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, worker: _Worker) -> None:
        assert self.ring is not None
        node, edge = self.node, self.node.settings.edge
        env = dict(os.environ)
        threads = edge.worker_tokenizer_threads
        if threads > 0:
            # Before the tokenizer's first parallel call builds rayon's pool: N workers x one rayon
            # thread per core oversubscribe the host, and idle rayon threads spin (issue 8 measured
            # 4.27 ms CPU per 32-input request).
            env["RAYON_NUM_THREADS"] = str(threads)
            if threads == 1:
                env["TOKENIZERS_PARALLELISM"] = "false"
        handoff = {
            "settings": node.settings.model_dump(mode="json"),
            "ring": self.ring.name, "layout": asdict(self.layout), "worker": worker.index, "port": self.port,
            "req_fd": self._req_w, "resp_fd": worker.resp_r, "ctrl_fd": worker.ctrl_r, "status_fd": self._status_w,
            "parent": os.getpid(), "created": node.created, "limiter": node.limiter_name,
            "node_id": node.node_id, "plane": self.plane,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", self.worker_module], stdin=subprocess.PIPE,
            pass_fds=(self._req_w, worker.resp_r, worker.ctrl_r, self._status_w), env=env, close_fds=True,
        )
        assert proc.stdin is not None
        # Secrets (database URL, join token) travel on the pipe, never on the command line.
        proc.stdin.write(json.dumps(handoff).encode())
        proc.stdin.close()
        worker.proc, worker.ready = proc, False

    def _on_status(self) -> None:
        try:
            data = os.read(self._status_r, 65536)
        except BlockingIOError:
            return
        for msg in self._status.feed(data):
            if msg.get("op") == "plane":  # a gpu feed process's counters and stage table
                self.planes[int(msg["worker"])] = {"gpu": msg["gpu"], "gpu_stages_us": msg["gpu_stages_us"]}
            elif msg.get("op") == "ready":
                self.workers[int(msg["worker"])].ready = True
                if all(w.ready for w in self.workers):
                    self._all_ready.set()

    async def _serve_engine(self) -> None:
        """Once the model is loaded, the slot batcher serves the ring and the ring says so."""
        node, ring, runtime = self.node, self.ring, self.node.runtime
        assert ring is not None and runtime is not None
        try:
            await runtime.wait_loaded()
        except Exception:
            ring.set_state(ENGINE_FAILED)
            return
        engine = runtime.engine
        assert engine is not None
        self.batcher = SlotBatcher(ring, engine.embed, node.settings.batcher, max_seq_len=runtime.max_seq_len,
                                   req_fd=self._req_r, resp_fds=[w.resp_w for w in self.workers],
                                   generation=_GENERATION, observer=node.engine_metrics)
        self.batcher.start()
        if not self._stopping:
            ring.set_state(ENGINE_UP, generation=_GENERATION, pid=os.getpid())
            self._up.set()

    async def _supervise(self) -> None:
        """Restart workers that die; push the routing table when it changes and the node's state each second."""
        last_view = 0.0
        while not self._stopping:
            await asyncio.sleep(0.25)
            if time.monotonic() - last_view >= 1.0:
                # Every port of the node answers /readyz alike: workers serve the node's own view.
                last_view = time.monotonic()
                self.broadcast({"op": "node", "readiness": self.node.readiness()})
            for worker in self.workers:
                proc = worker.proc
                if proc is None or proc.poll() is None or self._stopping:
                    continue
                log.error("fast front worker %d (pid %d) exited with %s; restarting it",
                          worker.index, proc.pid, proc.returncode)
                if self.batcher is not None:
                    await asyncio.to_thread(self.batcher.forget_worker, worker.index)
                worker.restarts += 1
                self._spawn(worker)
                self._send(worker, self._settings_message())
            table = self.node.routing_table()
            if table is not None and table.version != self._table_version:
                self._table_version = table.version
                self.broadcast({"op": "table", "table": table.to_dict(), "self": self.node.node_id})

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Drain: workers stop accepting and finish what they hold (bounded), then everything goes."""
        self._stopping = True
        ring = self.ring
        if ring is not None:
            ring.set_state(ENGINE_DRAINING)
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.wait, 2.0)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop, 2.0)
        loop = asyncio.get_running_loop()
        if self._status_r >= 0:
            loop.remove_reader(self._status_r)
        for worker in self.workers:
            with contextlib.suppress(OSError):
                os.write(worker.resp_w, pack_indices([DOWN_MARKER]))
            worker.close()
        for fd in (self._req_r, self._req_w, self._status_r, self._status_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if ring is not None:
            self.worker_metrics = []
            ring.close()
            self.ring = None
        if self._holder is not None:
            self._holder.close()

    # -- run-time changes ----------------------------------------------------------------
    def _settings_message(self) -> dict[str, Any]:
        return {"op": "limits", "limits": self.node.settings.limits.model_dump(mode="json")}

    def reconfigure(self) -> None:
        """New limits reach every worker; new batching rules reach the slot batcher."""
        if self.batcher is not None:
            self.batcher.reconfigure(self.node.settings.batcher)
        self.broadcast(self._settings_message())

    def broadcast(self, message: dict[str, Any]) -> None:
        for worker in self.workers:
            self._send(worker, message)

    def _send(self, worker: _Worker, message: dict[str, Any]) -> None:
        try:
            send_message(worker.ctrl_w, message)
        except OSError as exc:
            log.warning("could not reach worker %d: %s", worker.index, exc)

    # -- state ---------------------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Until the engine serves the ring (the model loaded, every worker listening)."""
        await self._up.wait()

    def check_health(self) -> None:
        dead = [w.index for w in self.workers if w.proc is None or w.proc.poll() is not None]
        if dead:
            raise ServiceUnavailable(f"fast front workers {dead} are not running", retry_after=1)
        if self.ring is None or self.ring.state == ENGINE_FAILED:
            raise ServiceUnavailable("the engine failed", retry_after=30)

    def readiness(self) -> dict[str, Any]:
        alive = sum(1 for w in self.workers if w.proc is not None and w.proc.poll() is None)
        detail: dict[str, Any] = {
            "workers": len(self.workers), "workers_alive": alive,
            "worker_restarts": sum(w.restarts for w in self.workers),
            "ring_state": ("loading", "up", "down", "failed", "draining")[self.ring.state] if self.ring else "closed",
        }
        if self.planes:  # gpu feeds: the counters summed, each feed's stage table
            totals: dict[str, int] = {}
            for report in self.planes.values():
                for key, value in report["gpu"].items():
                    totals[key] = totals.get(key, 0) + int(value)
            detail["gpu"] = totals
            detail["gpu_stages_us"] = {str(w): r["gpu_stages_us"] for w, r in sorted(self.planes.items())}
        if self.batcher is not None:
            cfg = self.batcher.config
            detail["batcher"] = {"max_batch_size": cfg.max_batch_size, "max_wait_us": cfg.max_wait_us,
                                 "queue_capacity": cfg.queue_capacity, "queued_slots": self.batcher.queue_depth}
        return detail

    @property
    def ready(self) -> bool:
        return (self.ring is not None and self.ring.state == ENGINE_UP
                and all(w.proc is not None and w.proc.poll() is None for w in self.workers))

    def load(self) -> tuple[int, int]:
        """(queued slots, slots admitted and not answered) for heartbeats."""
        if self.batcher is None:
            return 0, 0
        return self.batcher.queue_depth, self.batcher.admitted
