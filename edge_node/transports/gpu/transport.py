"""The ``gpu`` transport in the node process (``edge.gpu_feed: node``): one :class:`GpuDataplane` on the
node's port. With feed processes (the default) :class:`.worker.GpuWorkerTransport` runs one per feed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gazsi_cluster.errors import ConfigError, ServiceUnavailable

from .feed import FeedLimits
from .server import GpuDataplane

if TYPE_CHECKING:
    from edge_node.transports.base import TransportHost
    from gazsi_cluster.config import LimitsConfig, Settings

    from .device import HttpDevice

__all__ = ["GpuTransport", "refuse_tls"]


def refuse_tls(settings: Settings) -> None:
    """The gpu data plane, in the node process or in feed processes, cannot serve TLS: say so at start."""
    if settings.edge.tls.enabled:
        raise ConfigError(
            "edge.tls is set but the gpu data plane cannot serve TLS: its CUDA kernels parse and build "
            "plaintext HTTP. Terminate TLS in front of the node, or use edge.dataplane=fast.")


class GpuTransport:
    """The node's data plane on the GPU; refuses TLS (the kernels answer in plaintext) and says why.

    ``device`` is for tests: the CPU reference of the kernels instead of the CUDA ones.
    """

    name = "gpu"

    def __init__(self, node: TransportHost, *, device: Callable[[int], HttpDevice] | None = None) -> None:
        refuse_tls(node.settings)
        self.node = node
        self.plane: GpuDataplane | None = None
        self.port = 0
        self._device = device

    async def start(self) -> None:
        node, edge = self.node, self.node.settings.edge
        assert node.pipeline is not None
        self.plane = GpuDataplane.from_settings(node.pipeline, node.settings, node.settings.limits, self._device)
        self.plane.start()
        await self.plane.serve(edge.host, edge.port)
        self.port = self.plane.port

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.plane is not None:
            await self.plane.stop(timeout_s)

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New connections use ``limits`` (as on the other listeners)."""
        if self.plane is not None:
            self.plane.limits = FeedLimits.from_config(limits)

    async def wait_ready(self) -> None:
        """Serving as soon as :meth:`start` returned."""

    def check_health(self) -> None:
        if self.plane is None or self.plane.server is None or not self.plane.server.is_serving():
            raise ServiceUnavailable("the GPU data plane is not serving", retry_after=1)

    def readiness(self) -> dict[str, Any]:
        if self.plane is None:
            return {"gpu": None}
        return {"gpu": dict(self.plane.stats), "gpu_stages_us": self.plane.stages.summary()}

    @property
    def ready(self) -> bool:
        return self.plane is not None and self.plane.server is not None and self.plane.server.is_serving()
