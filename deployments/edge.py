"""The Edge deployment: one edge node per replica (one per GPU in the GPU profile).

Each replica runs the node's own data-plane HTTP server (the CDN path: clients that got this
edge from ``/v1/route`` talk to it directly), joins the control plane and heartbeats. Serve
only supervises it: health checks, ``user_config`` reconfiguration, graceful shutdown.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ray import serve

from deployments._settings import apply_user_config, replica_settings
from edge_node.agent import EdgeAgent, RayLink, node_facts
from edge_node.dataplane.socket.app import create_app
from edge_node.forwarding import PeerForwarding
from edge_node.runtime import EdgeRuntime
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.http.hardening import listener_options
from gazsi_cluster.http.server import start_server
from gazsi_cluster.routing import RoutingClient, RoutingTable, make_policy

log = logging.getLogger(__name__)


def _advertised_host(bind_host: str) -> str:
    if bind_host not in ("0.0.0.0", "::"):
        return bind_host
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


@serve.deployment(name="Edge", max_ongoing_requests=256, health_check_period_s=2, health_check_timeout_s=10,
                  graceful_shutdown_timeout_s=20)
class EdgeDeployment:
    # Serve awaits async constructors (replica.py: initialize_callable); mypy does not know that.
    async def __init__(  # type: ignore[misc]
        self, profile: str = "cpu", overrides: dict[str, Any] | None = None
    ) -> None:
        from control_plane import get_or_create_control_plane

        self.settings = replica_settings(profile, overrides)
        authorizer = build_authorizer(self.settings) if self.settings.auth.enabled else None
        self.runtime = EdgeRuntime(self.settings, authorizer=authorizer)
        await self.runtime.start(wait=True)
        link = RayLink(get_or_create_control_plane(self.settings))
        # The agent exists before the listener so the peer-forwarding layer can read its table;
        # it joins (with the listener's real port) once the listener is up.
        self.agent: EdgeAgent | None = None
        self.peers = RoutingClient(lambda: self.agent.table if self.agent else RoutingTable.empty(),
                                   make_policy(self.settings.control_plane.routing_policy))
        app = PeerForwarding(
            create_app(self.runtime, manage_lifespan=False), lambda: self.peers,
            lambda: self.agent.node_id if self.agent else None,
        )
        self.listener = await start_server(
            app, self.settings.edge.host, self.settings.edge.port,
            # Header/time/connection limits; no TLS here, the gateway reaches replicas over http.
            **listener_options(self.settings.limits),
        )
        port = self.listener.port
        facts = node_facts(self.runtime, advertise=_advertised_host(self.settings.edge.host), port=port)
        self.agent = EdgeAgent(self.runtime, link, facts=facts)
        await self.agent.start()
        self.url = f"http://{facts.address}:{port}"
        log.info("edge replica serving at %s", self.url)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch size, wait and limits change in place: no replica restart, no lost request."""
        if not user_config:
            return
        new = apply_user_config(self.settings, user_config)
        self.settings = new
        self.runtime.settings.limits = new.limits
        self.runtime.reconfigure(new.batcher)
        log.info("edge reconfigured: batcher=%s", new.batcher.model_dump())

    async def check_health(self) -> None:
        # Serve restarts the replica when this raises: it must reflect the engine and batcher.
        if not self.runtime.ready:
            raise RuntimeError(f"edge not ready: {self.runtime.readiness()}")
        engine = self.runtime.engine
        if engine is None or not engine.healthy():
            raise RuntimeError("engine unhealthy")
        if not self.listener.alive:
            raise RuntimeError("edge HTTP server stopped")

    async def info(self) -> dict[str, Any]:
        node_id = self.agent.node_id if self.agent else None
        return {"url": self.url, "node_id": node_id, **self.runtime.readiness()}

    async def __del__(self) -> None:
        # Graceful shutdown: leave the routing tables first, then finish in-flight work.
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.stop(say_goodbye=True)
        self.runtime.draining = True
        await self.listener.stop()
        await self.peers.aclose()
        await self.runtime.stop()
