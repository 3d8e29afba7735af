"""The gpu data plane in a feed process: one of ``edge.workers`` processes on the node's SO_REUSEPORT port.

The node process runs the fast front's layout (:class:`~edge_node.transports.fast.front.FastTransport`
with ``plane="gpu"``): it owns the engine and the slot batcher, and starts the feed processes. Each of
them builds the node in its worker role, as an HTTP worker does, but serves with
:class:`~edge_node.transports.gpu.server.GpuDataplane` instead of the httptools listener: its own CUDA
context, parse/admit/build kernels and GPU ring, its bursts parsed on the GPU, and the pipeline's embed
stage going through the shared-memory ring (:class:`~edge_node.transports.fast.ring_embedder.RingEmbedder`)
to the one engine, which still sees whole batches from all of them. One process held the plane to
2,539 ``/inference`` req/s on the H200 (its one event loop ran the feed, the pipeline, the batcher and
the engine's Python: issue 15); ten feed processes served 10,752 in the same lease, with no errors, but
at 1.08 ms of CPU per request: each feed has a CUDA context of its own, the GPU time-slices eleven of
them, and every synchronise spins meanwhile (docs/benchmarks.md, 2026-12-04). One context for the
feeds' kernels is the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_node.mps import join_share
from edge_node.transports.fast.channel import send_message
from edge_node.transports.fast.worker import WorkerHandoff, WorkerTransport
from edge_node.transports.gpu.feed import FeedLimits
from edge_node.transports.gpu.server import GpuDataplane
from edge_node.transports.gpu.transport import refuse_tls

if TYPE_CHECKING:
    from edge_node.transports.base import TransportHost
    from edge_node.transports.gpu.device import HttpDevice
    from gazsi_cluster.config import LimitsConfig

__all__ = ["GpuWorkerTransport"]


class GpuWorkerTransport(WorkerTransport):
    """A feed process's transport: the GPU data plane on the shared port, embedding through the ring.

    ``device`` is for tests: the CPU reference of the kernels instead of the CUDA ones.
    """

    name = "gpu-worker"

    def __init__(self, node: TransportHost, handoff: WorkerHandoff, *,
                 device: Callable[[int], HttpDevice] | None = None) -> None:
        refuse_tls(node.settings)
        # A feed tokenises its bursts on its own thread: Rust's thread pool spread a burst of 8 texts over the
        # cores at 1.8x the CPU time of one thread (2-core machine), time the other feeds and the engine need.
        # Read by the tokenizers library at each call; an operator's own setting stands.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Before this process makes its CUDA context (the plane's start): its share of the SMs under the node's MPS.
        join_share(node.settings.edge.gpu_mps_feed_sm_pct)
        super().__init__(node, handoff)
        self.plane: GpuDataplane | None = None
        self._device = device
        self._reporter: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._reporter = asyncio.create_task(self._report(), name="gazsi-gpu-feed-report")

    async def _report(self) -> None:
        """The plane's counters and stage table to the node each second: its /readyz shows every feed's."""
        while True:
            await asyncio.sleep(1.0)
            if self.plane is not None:
                with contextlib.suppress(OSError):  # the node is going away
                    send_message(self.handoff.status_fd, {"op": "plane", "worker": self.handoff.worker,
                                                          "gpu": dict(self.plane.stats),
                                                          "gpu_stages_us": self.plane.stages.summary()})

    async def _listen(self, sock: socket.socket) -> None:
        node = self.node
        assert node.pipeline is not None
        self.plane = GpuDataplane.from_settings(node.pipeline, node.settings, self._per_worker(node.settings.limits),
                                                self._device)
        self.plane.start()
        await self.plane.serve(sock=sock)

    async def _stop_listening(self, timeout_s: float) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter
        if self.plane is not None:
            await self.plane.stop(timeout_s)

    def apply_limits(self, limits: LimitsConfig) -> None:
        if self.plane is not None:
            self.plane.limits = FeedLimits.from_config(self._per_worker(limits))

    def readiness(self) -> dict[str, Any]:
        detail = super().readiness()
        if self.plane is not None:
            detail["gpu"] = dict(self.plane.stats)
            detail["gpu_stages_us"] = self.plane.stages.summary()
        return detail
