"""Peer forwarding: an overloaded edge, one without the requested model, or one that is not ready hands
the request to a peer from its routing table instead of failing.

A pipeline stage (:class:`edge_node.pipeline.Forwarder`): the pipeline runs the request locally first and
offers the refused ones here. ``X-Gazsi-Forwarded`` marks forwarded requests so they are never
forwarded twice (no loops). The peer's answer is relayed as it came, error or not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gazsi_cluster.errors import GazsiError
from gazsi_cluster.http.wire import HttpReply, HttpRequest
from gazsi_cluster.routing.client import RoutingClient

__all__ = ["PeerForwarder"]

log = logging.getLogger(__name__)

_PASS_HEADERS = ("authorization", "content-type", "x-gazsi-timing", "cache-control")
_DROP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "content-type", "date",
                 "server"}


class PeerForwarder:
    """``PeerForwarder(client, lambda: agent.node_id)``: forward through ``client`` excluding this node."""

    def __init__(self, client: RoutingClient, self_id: Callable[[], str | None]) -> None:
        self.client, self._self_id = client, self_id

    async def forward(self, request: HttpRequest, *, model: str | None) -> HttpReply | None:
        from edge_node.pipeline import FORWARDED_HEADER

        me = self._self_id()
        headers = {k: v for k, v in request.headers.items() if k in _PASS_HEADERS}
        headers[FORWARDED_HEADER] = me or "1"
        path = request.path + (f"?{request.query}" if request.query else "")
        # Peers behind a reverse tunnel (tunnel://, issue 17) are reachable only from the gateway holding
        # their tunnel, never from another edge: not candidates. Forwarding is the rare path; the scan is fine.
        exclude = {n.node_id for n in self.client.routable_table().nodes if n.url.startswith("tunnel://")}
        if me:
            exclude.add(me)
        try:
            resp = await self.client.request(request.method, path, content=request.body or None, headers=headers,
                                             model=model, exclude=exclude)
        except GazsiError as exc:
            log.info("no peer could take a forwarded request: %s", exc)
            return None
        kept = [(k, v) for k, v in resp.headers.items() if k.lower() not in _DROP_HEADERS]
        return HttpReply(resp.status_code, resp.content, kept,
                         content_type=resp.headers.get("content-type", "application/json"))

    async def aclose(self) -> None:
        await self.client.aclose()
