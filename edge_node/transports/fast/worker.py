"""The fast front, worker side: the transport of one HTTP worker process.

The node process writes a handoff (its settings, the ring's name and layout, this worker's pipe
descriptors) to the worker's stdin. The worker process (:mod:`edge_node.worker_process`) builds the
node's :class:`~edge_node.node.EdgeNode` in its worker role, whose transport is :class:`WorkerTransport`:
an :class:`~gazsi_cluster.http.listener.HttpListener` on the shared SO_REUSEPORT port (with the node's
TLS and listener limits), embedding through the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_node.transports.fast.channel import MessageReader, send_message
from edge_node.transports.fast.ring import RingLayout, SlotRing
from edge_node.transports.fast.ring_embedder import RingEmbedder
from gazsi_cluster.config import LimitsConfig
from gazsi_cluster.http.listener import HttpListener, bind_socket
from gazsi_cluster.routing.table import RoutingTable

if TYPE_CHECKING:
    from edge_node.transports.base import TransportHost

__all__ = ["WorkerHandoff", "WorkerTransport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerHandoff:
    """What the node process tells one worker (JSON on the worker's stdin)."""

    ring: str
    layout: RingLayout
    worker: int
    port: int
    req_fd: int
    resp_fd: int
    ctrl_fd: int
    status_fd: int
    parent: int
    created: int
    limiter: str | None = None
    node_id: str | None = None
    plane: str = "http"  # what the worker serves HTTP with: "http" (httptools) or "gpu" (the CUDA kernels)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerHandoff:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "layout": RingLayout(**data["layout"])})


class WorkerTransport:
    """The worker role's transport: the ring embedder, the control channel and the data listener."""

    name = "fast-worker"

    def __init__(self, node: TransportHost, handoff: WorkerHandoff) -> None:
        self.node, self.handoff = node, handoff
        self.ring = SlotRing.attach(handoff.layout, handoff.ring)
        self.metrics = self.ring.worker_metrics(handoff.worker)
        edge = node.settings.edge
        self.embedder = RingEmbedder(self.ring, handoff.worker, handoff.req_fd,
                                     node.settings.batcher.request_timeout_s,
                                     slot_wait_s=edge.ring_slot_wait_s, max_waiters=edge.ring_waiters_per_worker,
                                     flush_slots=self._flush_slots(edge.ring_flush_slots))
        self.listener: HttpListener | None = None
        self.port = handoff.port
        self.table: RoutingTable = RoutingTable.empty()
        self.self_id: str | None = handoff.node_id
        self.node_view: dict[str, Any] = {}  # the node process's /readyz, pushed every second
        self._control = MessageReader()

    async def start(self) -> None:
        node, h = self.node, self.handoff
        loop = asyncio.get_running_loop()
        for fd in (h.resp_fd, h.ctrl_fd):
            os.set_blocking(fd, False)
        loop.add_reader(h.resp_fd, self._on_responses)
        loop.add_reader(h.ctrl_fd, self._on_control)
        await self._listen(bind_socket(node.settings.edge.host, h.port, reuse_port=True))
        send_message(h.status_fd, {"op": "ready", "worker": h.worker, "pid": os.getpid()})

    async def _listen(self, sock: socket.socket) -> None:
        """Serve HTTP on ``sock`` (the node's SO_REUSEPORT port) through the node's pipeline."""
        from gazsi_cluster.tls import listener_context

        node = self.node
        assert node.pipeline is not None
        pipeline = node.pipeline
        self.listener = HttpListener(pipeline.handle, self._per_worker(node.settings.limits),
                                     ssl_context=listener_context(node.settings.edge.tls),
                                     max_body=lambda: pipeline.max_body_bytes)
        await self.listener.start(sock)

    async def _stop_listening(self, timeout_s: float) -> None:
        if self.listener is not None:
            await self.listener.stop(timeout_s)

    def _flush_slots(self, configured: int | None) -> int:
        """When to write filled slots to the engine: per slot where the workers have CPUs to themselves
        (H200, 10 workers on 12 cores: 48,558 req/s per slot against 44,731 once per loop turn, the engine's
        batches 44.5 against 36.7 inputs: the first requests of a turn no longer wait for the last), once per
        turn where they share them (2 cores, 2 workers: 8.8k against 7.4k req/s, the node's CPU per request
        0.025 against 0.036 ms: fewer system calls and wake-ups)."""
        if configured is not None:
            return configured
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return 1 if self.handoff.layout.workers + 2 <= cpus else 0

    def _per_worker(self, limits: LimitsConfig) -> LimitsConfig:
        """The node's connection cap per client address, shared out over its workers.

        The kernel spreads one client's connections over the workers (SO_REUSEPORT), and each worker
        counts its own; a cap of ceil(cap / workers) each keeps the node's total within the cap.
        """
        cap = limits.max_connections_per_client
        if not cap:
            return limits
        workers = self.handoff.layout.workers
        return limits.model_copy(update={"max_connections_per_client": max(1, -(-cap // workers))})

    def apply_limits(self, limits: LimitsConfig) -> None:
        if self.listener is not None:
            self.listener.limits = self._per_worker(limits)

    def _on_responses(self) -> None:
        try:
            data = os.read(self.handoff.resp_fd, 65536)
        except BlockingIOError:
            return
        if data:
            self.embedder.on_responses(data)

    def _on_control(self) -> None:
        try:
            data = os.read(self.handoff.ctrl_fd, 65536)
        except BlockingIOError:
            return
        if not data:  # the node closed its end: it is going away
            asyncio.get_running_loop().remove_reader(self.handoff.ctrl_fd)
            return
        for msg in self._control.feed(data):
            op = msg.get("op")
            if op == "limits":
                self.node.apply_limits(LimitsConfig(**msg["limits"]))
            elif op == "node":
                self.node_view = msg["readiness"]
            elif op == "table":
                self.table = RoutingTable.from_dict(msg["table"])
                self.self_id = msg.get("self") or self.self_id

    async def stop(self, timeout_s: float = 10.0) -> None:
        # Drain first: requests in flight still need their answers from the response pipe.
        await self._stop_listening(timeout_s)
        loop = asyncio.get_running_loop()
        for fd in (self.handoff.resp_fd, self.handoff.ctrl_fd):
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        self.embedder.fail_all()
        self.ring.close()

    async def wait_ready(self) -> None:
        """Serving as soon as :meth:`start` returned."""

    def check_health(self) -> None:
        self.embedder.check_ready()

    def readiness(self) -> dict[str, Any]:
        return {"worker": self.handoff.worker, "in_flight": self.embedder.in_flight}

    @property
    def ready(self) -> bool:
        try:
            self.embedder.check_ready()
        except Exception:
            return False
        return True
