"""The gateway's LLM routes: validate, pick an edge serving the model, relay; fail over before the first byte.

A request goes to a node the routing policy picks among those whose heartbeats list the model. A
node that cannot be reached, stays silent past ``llm.first_byte_timeout_s``, or answers 502/503/504
or an overloaded 429 before any byte of the answer is quarantined and the next node is tried (at most
``control_plane.retry_attempts`` nodes, within the routing client's retry budget). Once the first byte
is relayed the request belongs to that node: a failure then ends the stream with an SSE error event.
Keys, limits and usage stay on the edges (one enforcement point), as for embeddings.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson

from gazsi_cluster.config import LlmConfig
from gazsi_cluster.errors import NoHealthyNode, UnknownModel, UpstreamError
from gazsi_cluster.http.wire import HttpReply
from gazsi_cluster.llm.metrics import LlmMetrics, StreamClock
from gazsi_cluster.llm.protocol import ChatRequest, LlmRequest, decode_llm_request
from gazsi_cluster.llm.relay import Upstream, open_upstream, upstream_client
from gazsi_cluster.llm.sse import UsageTap
from gazsi_cluster.llm.stream import relay_events
from gazsi_cluster.routing import NodeEntry, RouteRequest, RoutingClient, RoutingTable, make_policy

__all__ = ["LlmRouter"]

log = logging.getLogger(__name__)

_FORWARDED_REQUEST = ("authorization", "content-type", "x-request-id", "accept")
_EVENT_STREAM = "text/event-stream"


def _retryable(up: Upstream) -> bool:
    if up.status in (502, 503, 504):
        return True
    if up.status == 429:
        with contextlib.suppress(Exception):
            return bool(orjson.loads(up.first).get("error", {}).get("code") == "overloaded")
    return False


class LlmRouter:
    """``handle(path, body, headers)`` answers one chat or completions request (see the module docstring)."""

    def __init__(self, routing: RoutingClient, table: Callable[[], RoutingTable], cfg: LlmConfig, *,
                 attempts: int, keep_headers: tuple[str, ...], verify: Any = True,
                 metrics: LlmMetrics | None = None) -> None:
        self.routing, self.table, self.cfg, self.attempts = routing, table, cfg, attempts
        self.keep = frozenset(h.lower() for h in keep_headers)
        self.metrics = metrics or LlmMetrics("gazsi_gateway_llm")
        self._verify = verify
        self._client: aiohttp.ClientSession | None = None
        # Prefix stickiness (KV-cache reuse, as Dynamo and llm-d route): a hash ring of its own, so the
        # embedding routes keep their policy.
        self._sticky = make_policy("hash") if cfg.prefix_affinity_chars > 0 else None

    def _http(self) -> aiohttp.ClientSession:
        if self._client is None:  # made lazily: it belongs to the loop that serves
            self._client = upstream_client(self.cfg, verify=self._verify)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def handle(self, path: str, body: bytes, headers: Mapping[str, str], received: float | None = None
                     ) -> HttpReply:
        received = time.perf_counter() if received is None else received
        req = decode_llm_request(path, body)
        table = self.table()
        if table.candidates() and not table.candidates(req.model):
            raise UnknownModel(f"The model `{req.model}` does not exist.", param="model")
        fwd = {k: v for k, v in headers.items() if k.lower() in _FORWARDED_REQUEST}
        up, node_id = await self._open(path, body, fwd, req.model, headers, self._prefix(req))
        reply_headers = up.headers(self.keep)
        self.metrics.requests.labels(req.model, path, str(up.status)).inc()
        if up.whole or not up.is_event_stream:
            await up.aclose()
            self.routing.policy.on_finish(node_id, time.perf_counter() - received, up.status < 500)
            return HttpReply(up.status, up.first, reply_headers, content_type=up.content_type)
        clock = StreamClock(self.metrics, req.model, received)
        tap = UsageTap()
        gauge = self.metrics.in_flight.labels(req.model)
        gauge.inc()

        async def on_end(outcome: str) -> None:
            gauge.dec()
            if outcome != "ok":
                self.metrics.stream_errors.labels(req.model, outcome).inc()
            clock.finish(tap.completion_tokens or tap.content_chunks, tap.prompt_tokens or 0)
            self.routing.policy.on_finish(node_id, time.perf_counter() - received, outcome in ("ok", "disconnect"))

        stream = relay_events(up, tap, chunk_timeout_s=self.cfg.chunk_timeout_s, clock=clock, on_end=on_end)
        return HttpReply(200, headers=[*reply_headers, ("cache-control", "no-cache")], content_type=_EVENT_STREAM,
                         stream=stream)

    def _prefix(self, req: LlmRequest) -> bytes | None:
        """The start of the prompt the backend will cache: what prefix stickiness hashes."""
        n = self.cfg.prefix_affinity_chars
        if self._sticky is None:
            return None
        if isinstance(req, ChatRequest):
            text = "".join(f"{m.role}:{m.content if isinstance(m.content, str) else ''}\n" for m in req.messages)
        else:
            text = req.prompt if isinstance(req.prompt, str) else str(req.prompt)
        return text[:n].encode()

    def _pick(self, req: RouteRequest, attempt: int) -> NodeEntry:
        """The first attempt follows the prefix when stickiness is on; a retry goes wherever the policy says."""
        if self._sticky is not None and req.key is not None and attempt == 0:
            down = self.routing.quarantined()
            table = self.routing.routable_table()
            try:
                return self._sticky.choose(table, RouteRequest(req.model, req.key, req.region, req.zone,
                                                               {*req.exclude, *down}))
            except NoHealthyNode:
                pass
        return self.routing.pick(RouteRequest(req.model, None, req.region, req.zone, req.exclude))

    async def _open(self, path: str, body: bytes, fwd: Mapping[str, str], model: str,
                    headers: Mapping[str, str], prefix: bytes | None = None) -> tuple[Upstream, str]:
        """The first node's answer whose first byte came, trying others on the failures they may not share."""
        tried: set[str] = set()
        last: Upstream | None = None
        last_id = ""
        failure: UpstreamError | None = None
        self.routing.budget.deposit()
        for attempt in range(self.attempts):
            if attempt and not self.routing.budget.try_spend():
                break
            try:
                node = self._pick(RouteRequest(model, prefix, headers.get("x-gazsi-region"),
                                               headers.get("x-gazsi-zone"), frozenset(tried)), attempt)
            except NoHealthyNode:
                if attempt == 0:
                    raise
                break
            tried.add(node.node_id)
            self.routing.policy.on_start(node.node_id)
            try:
                up = await open_upstream(self._http(), node.url.rstrip("/") + path, body, fwd, self.cfg)
            except UpstreamError as exc:
                failure = exc
                self.routing.policy.on_finish(node.node_id, 0.0, False)
                self.routing.report_failure(node, exc.message)
                continue
            except BaseException:  # the client left while we waited: the node did nothing wrong
                self.routing.policy.on_finish(node.node_id, 0.0, True)
                raise
            if not _retryable(up):
                if last is not None:
                    await last.aclose()
                return up, node.node_id
            self.routing.policy.on_finish(node.node_id, 0.0, False)
            self.routing.report_failure(node, f"HTTP {up.status}")
            if last is not None:
                await last.aclose()
            last, last_id = up, node.node_id
        if last is not None:
            self.routing.policy.on_start(last_id)  # balanced by the caller's on_finish
            return last, last_id  # every node refused: the last refusal, as its edge said it
        if failure is not None:
            raise failure
        raise NoHealthyNode("no healthy node is available", retry_after=1.0, model=model)
