"""The Edge deployment: one edge node per replica (one per GPU in the GPU profile).

A thin wrapper: the replica builds the same :class:`~edge_node.node.EdgeNode` as ``gazsi edge serve``
(by default the fast front: N HTTP worker processes on the node's own port, the engine in the
replica), joins the control plane through the detached actor and heartbeats. Serve only supervises
it: health checks (the engine, every worker process, the listeners), ``user_config``
reconfiguration (batching rules and limits reach every process in place), graceful shutdown (leave
the tables, drain every worker).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from deployments._settings import apply_user_config, replica_settings
from edge_node.agent import RayLink
from edge_node.node import EdgeNode
from gazsi_cluster.config import Settings

log = logging.getLogger(__name__)


def _advertised_host(bind_host: str) -> str:
    if bind_host not in ("0.0.0.0", "::"):
        return bind_host
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def _sized_to_replica(settings: Settings) -> Settings:
    """The fast front's workers (or the gpu plane's feed processes) from the CPUs Serve reserved for this
    replica (``num_cpus``).

    Two of them stay with the engine's threads and the node's own loop; an operator's explicit
    ``edge.workers`` wins. Sizing from the reservation, not the machine, keeps replicas that share a
    node from oversubscribing it.
    """
    if settings.edge.workers or settings.edge.dataplane == "asgi":
        return settings
    import ray

    cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
    settings.edge.workers = max(1, int(cpus) - 2)
    return settings


class EdgeReplica:
    """The replica's logic, testable without Ray (``EdgeDeployment`` is this class as a Serve deployment)."""

    def __init__(self, node: EdgeNode) -> None:
        self.node = node

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch size, wait and limits change in place: no replica restart, no lost request."""
        if not user_config:
            return
        self.node.reconfigure(apply_user_config(self.node.settings, user_config))
        log.info("edge reconfigured: batcher=%s limits=%s", self.node.settings.batcher.model_dump(),
                 self.node.settings.limits.model_dump())

    async def check_health(self) -> None:
        # Serve replaces the replica when this raises: the engine, every worker and the listeners count.
        self.node.check_health()

    async def info(self) -> dict[str, Any]:
        return {"url": self.node.url, "node_id": self.node.node_id, **self.node.readiness()}


@serve.deployment(name="Edge", max_ongoing_requests=256, health_check_period_s=2, health_check_timeout_s=10,
                  graceful_shutdown_timeout_s=20)
class EdgeDeployment(EdgeReplica):
    # Serve awaits async constructors (replica.py: initialize_callable); mypy does not know that.
    async def __init__(  # type: ignore[misc]
        self, profile: str = "cpu", overrides: dict[str, Any] | None = None
    ) -> None:
        from control_plane import get_or_create_control_plane

        settings = _sized_to_replica(replica_settings(profile, overrides))
        link = RayLink(get_or_create_control_plane(settings, serve_https=settings.control_plane.serve_https))
        node = EdgeNode(settings, link=link, advertise=_advertised_host(settings.edge.host))
        super().__init__(node)
        await node.start()
        # RUNNING in Serve means ready to serve: wait for the model (the listeners already answer 503).
        if node.runtime is not None:
            await node.runtime.wait_loaded()
        log.info("edge replica serving at %s (data plane %s: %s)", node.url, node.dataplane, node.dataplane_reason)

    async def __del__(self) -> None:
        # Serve calls this after a constructor that raised too (a bad model dir, a busy port): there
        # may be no node yet, and an AttributeError here would bury the constructor's own error.
        node = getattr(self, "node", None)
        if node is not None:
            await node.stop()
