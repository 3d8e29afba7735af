"""HTTP surface of the control plane: node API (join, mTLS heartbeat, table), admin, /v1/route.

Routers are built by factories that take an ``authorize`` callable, so the gateway can mount
``/v1/route`` behind its own key authentication and the control plane's own app can guard
``/admin/nodes`` with its admin token. The client certificate of an mTLS connection reaches
handlers as ``request.state.tls_peer_cert`` (DER), put there by :mod:`control_plane.server`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from control_plane.ca import node_id_from_cert
from control_plane.service import ControlPlane
from gazsi_cluster import __version__
from gazsi_cluster.errors import AuthenticationError, PermissionDenied
from gazsi_cluster.http.asgi import install_error_handlers
from gazsi_cluster.protocol import NodeFacts, NodeLoad
from gazsi_cluster.routing.policies import RouteRequest, RoutingPolicy
from gazsi_cluster.routing.table import RoutingTable
from gazsi_cluster.tunnel import tunnelled_ids

__all__ = ["Authorize", "admin_router", "admin_token_authorizer", "create_app", "node_router", "route_router"]

log = logging.getLogger(__name__)

Authorize = Callable[[Request], Awaitable[Any]]


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str | None = Field(None, max_length=512, description="The cluster's join token.")
    facts: NodeFacts
    csr: str | None = Field(None, max_length=16_384, description="PEM CSR; absent = a key is made for the node.")


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str = Field(..., max_length=128)
    load: NodeLoad


def _json(data: Any, status: int = 200) -> Response:
    import orjson

    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def peer_node_id(request: Request) -> str | None:
    """The node id proven by the connection's client certificate, if any."""
    der = getattr(request.state, "tls_peer_cert", None)
    return node_id_from_cert(der) if der else None


def admin_token_authorizer(token: str | None) -> Authorize:
    """Bearer-token check for the control plane's own admin API (constant-time compare)."""

    async def authorize(request: Request) -> None:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if token is None:
            raise PermissionDenied("admin API disabled: set control_plane.admin_token")
        if not given or not secrets.compare_digest(given.encode(), token.encode()):
            raise AuthenticationError("invalid admin token")

    return authorize


def node_router(cp: ControlPlane, *, authorize_table: Authorize | None = None) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/join")
    async def join(request: Request, body: Annotated[JoinRequest, Body()]) -> Response:
        return _json(cp.join(body.facts, body.token, csr=body.csr, proven_id=peer_node_id(request)))

    @router.post("/v1/heartbeat")
    async def heartbeat(request: Request, body: Annotated[HeartbeatRequest, Body()]) -> Response:
        proven = peer_node_id(request)
        if proven is None:
            cp.registry.rejected["no_client_cert"] = cp.registry.rejected.get("no_client_cert", 0) + 1
            raise AuthenticationError("heartbeats need the node's client certificate (mTLS)")
        if proven != body.node_id:
            cp.registry.rejected["forged_node_id"] = cp.registry.rejected.get("forged_node_id", 0) + 1
            log.warning("forged heartbeat: certificate of %s claims %s", proven, body.node_id)
            raise PermissionDenied("the certificate does not belong to this node id", param="node_id")
        return _json(cp.heartbeat(body.node_id, body.load))

    @router.get("/v1/table")
    async def table(request: Request, since: Annotated[int, Query(ge=-1)] = -1) -> Response:
        if peer_node_id(request) is None:
            if authorize_table is None:
                raise AuthenticationError("the routing table needs a node certificate or an admin token")
            await authorize_table(request)
        data = cp.table_since(since)
        return Response(status_code=204) if data is None else _json(data)

    return router


def admin_router(cp: ControlPlane, authorize: Authorize) -> APIRouter:
    """``/admin/nodes``: list, show, drain, remove."""
    router = APIRouter(prefix="/admin/nodes")

    @router.get("")
    async def list_nodes(request: Request) -> Response:
        await authorize(request)
        return _json({"object": "list", "data": cp.list_nodes(), "counts": cp.registry.counts()})

    @router.get("/{node_id}")
    async def show(request: Request, node_id: str) -> Response:
        await authorize(request)
        return _json(cp.show(node_id))

    @router.post("/{node_id}/drain")
    async def drain(request: Request, node_id: str) -> Response:
        await authorize(request)
        return _json(cp.drain(node_id))

    @router.delete("/{node_id}")
    async def remove(request: Request, node_id: str) -> Response:
        await authorize(request)
        return _json(cp.remove(node_id))

    return router


def route_router(
    table: Callable[[], RoutingTable], policy: RoutingPolicy, authorize: Authorize, *,
    on_decision: Callable[[str], None] | None = None,
) -> APIRouter:
    """``GET /v1/route``: the best edge URL for this client (CDN-style redirect target).

    The client's region comes from ``?region=`` or the ``X-Gazsi-Region`` header; ``?key=``
    asks the hash policy for the node that caches that input.
    """
    router = APIRouter()

    @router.get("/v1/route")
    async def route(
        request: Request,
        model: Annotated[str | None, Query(max_length=128)] = None,
        region: Annotated[str | None, Query(max_length=64)] = None,
        zone: Annotated[str | None, Query(max_length=64)] = None,
        key: Annotated[str | None, Query(max_length=4096)] = None,
    ) -> Response:
        await authorize(request)
        region = region or request.headers.get("x-gazsi-region")
        zone = zone or request.headers.get("x-gazsi-zone")
        current = table()
        # Nodes behind reverse tunnels (issue 17) are reachable only through a gateway: not for clients.
        node = policy.choose(current, RouteRequest(model=model, key=key, region=region, zone=zone,
                                                   exclude=tunnelled_ids(current)))
        if on_decision is not None:
            on_decision(policy.name)
        return _json({"url": node.url, "node_id": node.node_id, "region": node.region, "zone": node.zone})

    return router


def create_app(cp: ControlPlane, *, policy: RoutingPolicy | None = None) -> FastAPI:
    """The control plane's own HTTPS app (node API, admin, /v1/route, /metrics)."""
    from gazsi_cluster.routing.policies import make_policy

    admin = admin_token_authorizer(cp.config.admin_token)
    app = FastAPI(title="GAZSI control plane", version=__version__, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(node_router(cp, authorize_table=admin))
    app.include_router(admin_router(cp, admin))
    pol = policy or make_policy(cp.config.routing_policy, region=cp.config.client_region,
                                fallbacks=cp.config.region_fallbacks)
    app.include_router(route_router(lambda: cp.table, pol, admin,
                                    on_decision=lambda name: cp.metrics.routing.decisions.labels(name).inc()))

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(cp.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
