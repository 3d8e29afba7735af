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
from gazsi_cluster.routing import RoutingClient, RoutingMetrics, RoutingTable, make_policy

__all__ = ["FORWARDED_RESPONSE_HEADERS", "Gateway"]

log = logging.getLogger(__name__)

# What an edge's answer keeps on its way back (hop-by-hop and server headers are dropped).
FORWARDED_RESPONSE_HEADERS = (
    "content-type", "retry-after", "x-gazsi-cache", "server-timing", "www-authenticate",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)
_FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "cache-control", "x-gazsi-timing", "x-request-id")


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        authorizer: Authorizer,
        table: Callable[[], RoutingTable],
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.authorizer = authorizer
        self.table = table
        cfg = settings.control_plane
        self.policy = make_policy(cfg.routing_policy)
        self.routing_metrics = RoutingMetrics()
        self.routing = RoutingClient(
            table, self.policy, http=http, hedge=cfg.hedge, metrics=self.routing_metrics,
        )

    async def aclose(self) -> None:
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
        out = {k: v for k, v in resp.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
        return resp.status_code, out, resp.content

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
