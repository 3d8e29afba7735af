"""The fast front, worker side: one HTTP worker process (``python -m edge_node.transports.fast.worker``).

The node process writes a handoff (its settings, the ring's name and layout, this worker's pipe
descriptors) to the worker's stdin. The worker builds the node's :class:`~edge_node.node.EdgeNode` in
its worker role, whose transport is :class:`WorkerTransport`: an :class:`~gazsi_cluster.http.listener.HttpListener`
on the shared SO_REUSEPORT port (with the node's TLS and listener limits), embedding through the ring.
SIGTERM drains: stop accepting, finish what is in flight (bounded), exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_node.transports.fast.channel import MessageReader, send_message
from edge_node.transports.fast.ring import RingLayout, SlotRing
from edge_node.transports.fast.ring_embedder import RingEmbedder
from gazsi_cluster.config import LimitsConfig
from gazsi_cluster.http.listener import HttpListener, bind_socket
from gazsi_cluster.routing.table import RoutingTable

if TYPE_CHECKING:
    from edge_node.node import EdgeNode

__all__ = ["WorkerHandoff", "WorkerTransport", "main"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerHandoff:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "layout": RingLayout(**data["layout"])})


class WorkerTransport:
    """The worker role's transport: the ring embedder, the control channel and the data listener."""

    name = "fast-worker"

    def __init__(self, node: EdgeNode, handoff: WorkerHandoff) -> None:
        self.node, self.handoff = node, handoff
        self.ring = SlotRing.attach(handoff.layout, handoff.ring)
        self.embedder = RingEmbedder(self.ring, handoff.worker, handoff.req_fd,
                                     node.settings.batcher.request_timeout_s)
        self.listener: HttpListener | None = None
        self.port = handoff.port
        self.table: RoutingTable = RoutingTable.empty()
        self.self_id: str | None = handoff.node_id
        self.node_view: dict[str, Any] = {}  # the node process's /readyz, pushed every second
        self._control = MessageReader()

    async def start(self) -> None:
        from gazsi_cluster.tls import server_context

        node, h = self.node, self.handoff
        loop = asyncio.get_running_loop()
        for fd in (h.resp_fd, h.ctrl_fd):
            os.set_blocking(fd, False)
        loop.add_reader(h.resp_fd, self._on_responses)
        loop.add_reader(h.ctrl_fd, self._on_control)
        tls = node.settings.edge.tls
        ctx = None
        if tls.certfile is not None and tls.keyfile is not None:
            ctx = server_context(tls.certfile, tls.keyfile, client_ca=tls.client_ca_file,
                                 require_client_cert=tls.require_client_cert)
        assert node.pipeline is not None
        pipeline = node.pipeline
        self.listener = HttpListener(pipeline.handle, self._per_worker(node.settings.limits), ssl_context=ctx,
                                     max_body=lambda: pipeline.max_body_bytes)
        await self.listener.start(bind_socket(node.settings.edge.host, h.port, reuse_port=True))
        send_message(h.status_fd, {"op": "ready", "worker": h.worker, "pid": os.getpid()})

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
        if self.listener is not None:
            await self.listener.stop(timeout_s)
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


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: orphans possible after kill -9 of the node
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the node died before prctl took effect
        os._exit(1)


async def _serve(handoff_json: dict[str, Any]) -> None:
    from edge_node.node import EdgeNode
    from gazsi_cluster.config import settings_from_dump

    settings = settings_from_dump(handoff_json["settings"])
    handoff = WorkerHandoff.from_json(handoff_json)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with EdgeNode(settings, worker=handoff):
        await stop.wait()


def main() -> int:
    """Entry point of a worker process (started by :class:`~edge_node.transports.fast.front.FastTransport`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the node decides
    handoff = json.loads(sys.stdin.read())
    _die_with_parent(int(handoff["parent"]))
    level = str(handoff["settings"].get("log_level", "info")).upper()
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s worker-{handoff['worker']} %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(handoff))
    else:
        uvloop.run(_serve(handoff))
    return 0


if __name__ == "__main__":
    sys.exit(main())
