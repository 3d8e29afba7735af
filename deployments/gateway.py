"""The Gateway deployment: the cluster's public ingress (Serve's proxy and a direct listener).

Per-request traffic does not have to pass Ray's HTTP proxy (measured ~14x slower than plain
uvicorn on a 2-core machine; 175 req/s on the H200): every gateway replica also serves the same API
on ``gateway.host:gateway.port`` with SO_REUSEPORT, so replicas on one host share the port. That
listener is the edges' :class:`~gazsi_cluster.http.listener.HttpListener` with
:class:`~gazsi_cluster.gateway.DirectGateway`: the data routes without FastAPI, the rest through the app.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ray import serve

from deployments._settings import apply_user_config, replica_settings
from edge_node.agent import RayLink
from gazsi_cluster.auth import AllowAll, Authorizer
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.gateway import DirectGateway, Gateway, create_gateway_app
from gazsi_cluster.http.listener import HttpListener, bind_socket
from gazsi_cluster.routing import TableFollower
from gazsi_cluster.tls import listener_context
from gazsi_cluster.tunnel import tunnel_hub

log = logging.getLogger(__name__)


@serve.deployment(name="Gateway", max_ongoing_requests=512, health_check_period_s=2, graceful_shutdown_timeout_s=20)
@serve.ingress()
class GatewayDeployment:
    # Serve awaits async constructors (replica.py: initialize_callable); mypy does not know that.
    async def __init__(  # type: ignore[misc]
        self, edge: Any = None, profile: str = "cpu", overrides: dict[str, Any] | None = None
    ) -> None:
        from control_plane import get_or_create_control_plane

        # `edge` is the Edge deployment's handle: binding it makes Serve deploy the edges with
        # this app; requests go to edges over their own HTTP listeners, not through the handle.
        self.edge = edge
        self.settings = replica_settings(profile, overrides)
        self.authorizer: Authorizer = (
            build_authorizer(self.settings) if self.settings.auth.enabled else AllowAll()
        )
        start = getattr(self.authorizer, "start", None)
        if start is not None:
            await start()
        link = RayLink(get_or_create_control_plane(
            self.settings, serve_https=self.settings.control_plane.serve_https))
        self.follower = TableFollower(link.table, refresh_s=self.settings.control_plane.table_refresh_s)
        with contextlib.suppress(Exception):
            await self.follower.refresh()
        await self.follower.start()
        # Reverse tunnels from edges behind NAT (issue 17), when gateway.tunnel_port is set. With several
        # replicas each holds the tunnels that reached it; a node is routed only by the replica holding its tunnel.
        self.tunnels = tunnel_hub(self.settings.gateway)
        if self.tunnels is not None:
            gw = self.settings.gateway
            await self.tunnels.start(bind_socket(gw.tunnel_host, gw.tunnel_port or 0, reuse_port=True))
            log.info("gateway tunnel listener on %s:%d", gw.tunnel_host, self.tunnels.port)
        self.gateway = Gateway(self.settings, authorizer=self.authorizer, table=self.follower, tunnels=self.tunnels)
        # Every pulled table, not only those seen by a request, becomes the routing client's last non-empty one.
        routing = self.gateway.routing
        self.follower.watch(lambda _table: routing.routable_table())
        self.asgi = create_gateway_app(self.gateway)
        self.listener: HttpListener | None = None
        if self.settings.gateway.port:
            # The data routes without FastAPI (DirectGateway), the rest through the app; the edges' listener.
            gw = self.settings.gateway
            direct = DirectGateway(self.gateway, create_gateway_app(self.gateway))
            self.listener = HttpListener(direct.handle, self.settings.limits, ssl_context=listener_context(gw.tls),
                                         max_body=lambda: self.settings.limits.max_body_bytes)
            await self.listener.start(bind_socket(gw.host, gw.port, reuse_port=True))
            log.info("gateway direct listener on %s:%d", gw.host, gw.port)

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        if user_config:
            self.settings = apply_user_config(self.settings, user_config)
            self.gateway.settings = self.settings

    async def check_health(self) -> None:
        if self.listener is not None and not all(server.is_serving() for server in self.listener.servers):
            raise RuntimeError("gateway direct listener stopped")

    async def __del__(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.tunnels is not None:
            await self.tunnels.stop()
        await self.follower.stop()
        await self.gateway.aclose()
        close = getattr(self.authorizer, "close", None)
        if close is not None:
            await close()
