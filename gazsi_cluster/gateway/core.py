"""Gateway logic without HTTP framework code: pick an edge, forward, fail over.

Edges are the single enforcement point for keys, limits, usage and the response cache, so a
request is never counted twice; the gateway validates shape early (cheap 4xx without a hop),
routes with the configured policy on the pushed routing table, and retries another edge when
one cannot be reached (embeddings are idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from gazsi_cluster.auth import Authorizer
from gazsi_cluster.config import Settings
from gazsi_cluster.errors import InvalidRequest, UnknownModel
from gazsi_cluster.http.wire import HttpReply
from gazsi_cluster.llm.router import LlmRouter
from gazsi_cluster.routing import RoutingClient, RoutingMetrics, RoutingTable, make_policy
from gazsi_cluster.tls import routing_client_context
from gazsi_cluster.tunnel import TunnelHub, TunnelSender

__all__ = ["FORWARDED_RESPONSE_HEADERS", "Gateway", "relay"]

log = logging.getLogger(__name__)

# What an edge's answer keeps on its way back (hop-by-hop and server headers are dropped).
FORWARDED_RESPONSE_HEADERS = (
    "content-type", "retry-after", "x-gazsi-cache", "server-timing", "www-authenticate",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)
_FORWARDED_REQUEST_HEADERS = frozenset(
    ("authorization", "content-type", "cache-control", "x-gazsi-timing", "x-request-id"))
_KEPT_RESPONSE_HEADERS = frozenset(FORWARDED_RESPONSE_HEADERS)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        authorizer: Authorizer,
        table: Callable[[], RoutingTable],
        http: httpx.AsyncClient | None = None,
        tunnels: TunnelHub | None = None,
    ) -> None:
        self.settings = settings
        self.authorizer = authorizer
        # With reverse tunnels (issue 17), a tunnel:// node is routable only while this gateway holds its tunnel.
        self.tunnels = tunnels
        self.table = table = tunnels.view(table) if tunnels is not None else table
        cfg = settings.control_plane
        self.policy = make_policy(cfg.routing_policy, region=cfg.client_region, fallbacks=cfg.region_fallbacks)
        self.routing_metrics = RoutingMetrics()
        # The one place gateway.edge_tls is read: mTLS to https:// edges with the cluster CA (issue 18).
        edge_tls = routing_client_context(settings.gateway.edge_tls)
        self.routing = RoutingClient(
            table, self.policy, http=http, hedge=cfg.hedge, metrics=self.routing_metrics,
            attempts=cfg.retry_attempts, timeout_s=cfg.request_timeout_s, connect_timeout_s=cfg.connect_timeout_s,
            ssl_context=edge_tls,
        )
        if tunnels is not None:
            self.routing.sender = TunnelSender(self.routing.sender, tunnels, timeout_s=cfg.request_timeout_s)
        # Chat and completions (issue 16): streamed through the same table, policy, quarantine and TLS.
        self.llm = LlmRouter(self.routing, table, settings.llm, attempts=cfg.retry_attempts,
                             keep_headers=FORWARDED_RESPONSE_HEADERS, verify=edge_tls if edge_tls is not None else True)

    async def aclose(self) -> None:
        await self.llm.aclose()
        await self.routing.aclose()

    async def forward(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        model: str | None = None,
        affinity_key: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send a request to the best edge (with failover); returns status, headers, body."""
        fwd = {k: v for k, v in headers.items() if k.lower() in _FORWARDED_REQUEST_HEADERS}
        resp = await self.routing.request(
            method, path, model=model, key=affinity_key, region=headers.get("x-gazsi-region"),
            zone=headers.get("x-gazsi-zone"), content=body, params=params, headers=fwd,
        )
        out = {k: v for k, v in resp.headers.items() if k.lower() in _KEPT_RESPONSE_HEADERS}
        return resp.status_code, out, resp.content

    async def embeddings(self, model: str, dimensions: int | None, raw: bytes,
                         headers: Mapping[str, str]) -> HttpReply:
        """``POST /v1/embeddings``: the ``model`` and ``dimensions`` of a validated body, and its ``raw`` bytes
        (forwarded as they came): checked here, answered by an edge."""
        if dimensions is not None and dimensions < 1:
            raise InvalidRequest("dimensions must be a positive integer", param="dimensions")
        table = self.table()
        if table.candidates() and not table.candidates(model):
            # Found by the schemathesis pass (issue 9): a model no edge serves is the client's
            # mistake (404, as on an edge), not a 503 "no healthy node" inviting retries.
            raise UnknownModel(f"The model `{model}` does not exist.", param="model")
        affinity = raw if self.policy.name == "hash" else None
        return relay(*await self.forward("POST", "/v1/embeddings", headers=headers, body=raw, model=model,
                                         affinity_key=affinity))

    async def inference(self, d: str | None, headers: Mapping[str, str]) -> HttpReply:
        """GAZSI's ``GET /inference?d=``, answered by an edge."""
        if not d:
            raise InvalidRequest("query parameter d must hold the text to embed", param="d")
        affinity = d.encode() if self.policy.name == "hash" else None
        return relay(*await self.forward("GET", "/inference", headers=headers, params={"d": d}, affinity_key=affinity))

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for node in self.table().candidates():
            for m in node.models:
                seen[m] = None
        return list(seen) or [self.settings.engine.model]

    def status(self) -> dict[str, Any]:
        """``edges``: in the current table; ``routable_edges``: what requests are routed over, which
        stays the last non-empty table while the control plane restarts or a lone edge is late."""
        table = self.table()
        return {"edges": len(table.candidates()), "routable_edges": len(self.routing.routable_table()),
                "table_version": table.version, "policy": self.policy.name}


def relay(status: int, headers: dict[str, str], body: bytes) -> HttpReply:
    """An edge's answer as a reply (header names as the edge's client spelled them: compared lower-case)."""
    content_type = "application/json"
    extra = []
    for name, value in headers.items():
        if name.lower() == "content-type":
            content_type = value
        else:
            extra.append((name, value))
    return HttpReply(status, body, extra, content_type=content_type)
