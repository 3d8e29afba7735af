"""What a transport is, and what it may read from the node it serves.

:class:`~edge_node.node.EdgeNode` builds a transport and hands it itself; the transports type that
argument against :class:`TransportHost` below, never against ``EdgeNode``, so the arrows run one way:
the node imports its transports, a transport imports only this contract (and the pipeline it calls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edge_node.metrics import EngineMetrics
    from edge_node.pipeline import EdgePipeline
    from edge_node.runtime import ModelRuntime
    from gazsi_cluster.auth import Authorizer
    from gazsi_cluster.config import LimitsConfig, Settings
    from gazsi_cluster.model import ModelSpec
    from gazsi_cluster.routing import RoutingTable

__all__ = ["OpsSource", "Transport", "TransportHost"]


class Transport(Protocol):
    """One way of serving the node's HTTP: listeners up at :meth:`start`, drained at :meth:`stop`."""

    name: str
    port: int

    async def start(self) -> None: ...

    async def stop(self, timeout_s: float = 10.0) -> None: ...

    async def wait_ready(self) -> None: ...

    def check_health(self) -> None: ...

    def readiness(self) -> dict[str, Any]: ...

    @property
    def ready(self) -> bool: ...


class OpsSource(Protocol):
    """What the operator routes (readiness, metrics, key admin) read from the node."""

    authorizer: Authorizer

    def readiness(self) -> dict[str, Any]: ...

    def render_metrics(self) -> bytes: ...

    @property
    def max_body_bytes(self) -> int: ...


class TransportHost(OpsSource, Protocol):
    """The node as its transport sees it (read-only, except :meth:`apply_limits`)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def created(self) -> int: ...

    @property
    def pipeline(self) -> EdgePipeline | None: ...

    @property
    def runtime(self) -> ModelRuntime | None: ...

    @property
    def engine_metrics(self) -> EngineMetrics: ...

    @property
    def limiter_name(self) -> str | None: ...

    @property
    def node_id(self) -> str | None: ...

    def routing_table(self) -> RoutingTable | None: ...

    def apply_limits(self, limits: LimitsConfig) -> None: ...
