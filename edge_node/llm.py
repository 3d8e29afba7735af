"""The node's LLM models: chat and completions relayed to node-local OpenAI-compatible servers (issue 16).

The pipeline decodes, authorises and checks the model (its one flow); :meth:`LlmBackends.relay` does the
rest for a request it was handed: admission (``llm.max_in_flight``, 429 at once beyond it), the key's
token budget (a request's ``max_tokens`` reserved before it reaches the backend, settled with what it
used), the upstream request (``stream_options.include_usage`` added when streaming, so usage comes from
the backend's own tokenizer), the relay, the usage record and the per-model metrics. Where an upstream
reports no usage, each content chunk counts as one completion token (llama.cpp and vLLM stream one
token per chunk).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from gazsi_cluster.auth import Authorizer, Principal
from gazsi_cluster.config import LlmConfig, ModelConfig
from gazsi_cluster.errors import InvalidRequest, Overloaded, PayloadTooLarge, UpstreamError
from gazsi_cluster.http.wire import HttpReply, HttpRequest
from gazsi_cluster.llm import LlmMetrics, UsageTap, open_upstream, upstream_client
from gazsi_cluster.llm.metrics import StreamClock
from gazsi_cluster.llm.protocol import CHAT, COMPLETIONS, LlmRequest
from gazsi_cluster.llm.stream import relay_events

__all__ = ["LlmBackends"]

log = logging.getLogger(__name__)

_ROUTES_OF_KIND = {"chat": (CHAT, COMPLETIONS), "completion": (COMPLETIONS,), "embedding": ()}


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class LlmBackends:
    """See the module docstring; ``start``/``aclose`` belong to the node's lifespan."""

    def __init__(self, models: list[ModelConfig], cfg: LlmConfig, authorizer: Authorizer,
                 metrics: LlmMetrics | None = None) -> None:
        self.models = {m.name: m for m in models}
        self.cfg, self.authorizer = cfg, authorizer
        self.metrics = metrics or LlmMetrics()
        self.in_flight = 0
        self._client: aiohttp.ClientSession | None = None

    def names(self) -> list[str]:
        return list(self.models)

    def serves(self, model: str, path: str) -> bool:
        m = self.models.get(model)
        return m is not None and path in _ROUTES_OF_KIND[m.kind]

    async def start(self) -> None:
        if self.models and self._client is None:
            self._client = upstream_client(self.cfg)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _upstream_body(self, m: ModelConfig, req: LlmRequest, raw: bytes) -> tuple[bytes, bool]:
        """The body the upstream gets, and whether its usage-only chunk is ours to withhold."""
        data: dict[str, Any] = orjson.loads(raw)
        if m.upstream_model:
            data["model"] = m.upstream_model
        drop = False
        if req.stream:
            options = dict(data.get("stream_options") or {})
            if not options.get("include_usage"):
                options["include_usage"] = True
                data["stream_options"] = options
                drop = True
        return orjson.dumps(data), drop

    async def relay(self, request: HttpRequest, req: LlmRequest, principal: Principal) -> HttpReply:
        """Answer ``req`` (validated, authorised, served here) from its upstream."""
        if self._client is None:
            raise UpstreamError("the LLM relay is not running")
        if self.in_flight >= self.cfg.max_in_flight:
            raise Overloaded(f"{self.in_flight} LLM requests in flight on this node", retry_after=1.0)
        m = self.models[req.model]
        body, drop = self._upstream_body(m, req, request.body)
        reserved = req.token_cap or 0
        await self.authorizer.reserve_tokens(principal, model=m.name, tokens=reserved)
        self.in_flight += 1
        gauge = self.metrics.in_flight.labels(m.name)
        gauge.inc()
        headers = {"content-type": "application/json", "accept": request.headers.get("accept", "*/*")}
        if m.api_key:
            headers["authorization"] = f"Bearer {m.api_key}"
        streamed = False
        try:
            up = await open_upstream(self._client, _base(m.url) + request.path, body, headers, self.cfg)
        except BaseException:
            # Nothing was served: the reservation goes back and no request is billed.
            await asyncio.shield(self.authorizer.record_usage(principal, model=m.name, tokens=0, reserved=reserved,
                                                              requests=0))
            self.in_flight -= 1
            gauge.dec()
            raise
        try:
            self.metrics.requests.labels(m.name, request.path, str(up.status)).inc()
            if up.whole or not up.is_event_stream:
                await up.aclose()
                return await self._whole(up.status, up.first, up.content_type, m, reserved, principal, request)
            streamed = True
            return self._stream(up, m, drop, reserved, principal, request)
        finally:
            if not streamed:
                self.in_flight -= 1
                gauge.dec()

    async def _whole(self, status: int, raw: bytes, content_type: str, m: ModelConfig, reserved: int,
                     principal: Principal, request: HttpRequest) -> HttpReply:
        tap = UsageTap()
        ok = status == 200
        if ok:
            tap.body(raw)
        tokens = (tap.prompt_tokens or 0) + (tap.completion_tokens or 0)
        await self.authorizer.record_usage(principal, model=m.name, tokens=tokens, reserved=reserved,
                                           requests=1 if ok else 0)
        if ok:
            clock = StreamClock(self.metrics, m.name, request.received)
            clock.finish(tap.completion_tokens or 0, tap.prompt_tokens or 0)
            return HttpReply(200, raw, list(principal.headers), content_type=content_type)
        if status in (400, 422):  # the request's fault: the client hears the server's own words
            raise InvalidRequest(f"the model server refused the request: {_message(raw)}")
        if status == 413:
            raise PayloadTooLarge(f"the model server refused the request: {_message(raw)}")
        if status == 429:  # the backend is busy: a gateway tries another node
            raise Overloaded("the model server is busy", retry_after=1.0)
        # 401/403/404 from a node-local server is this node's misconfiguration, 5xx its failure: not the client's.
        raise UpstreamError(f"the model server answered HTTP {status}")

    def _stream(self, up: Any, m: ModelConfig, drop: bool, reserved: int, principal: Principal,
                request: HttpRequest) -> HttpReply:
        tap = UsageTap(drop_usage_chunk=drop)
        clock = StreamClock(self.metrics, m.name, request.received)
        gauge = self.metrics.in_flight.labels(m.name)

        async def on_end(outcome: str) -> None:
            self.in_flight -= 1
            gauge.dec()
            if outcome != "ok":
                self.metrics.stream_errors.labels(m.name, outcome).inc()
            completion = tap.completion_tokens if tap.completion_tokens is not None else tap.content_chunks
            prompt = tap.prompt_tokens or 0
            clock.finish(completion, prompt)
            # What the backend generated is billed, also for a client that left half way.
            try:
                await self.authorizer.record_usage(principal, model=m.name, tokens=prompt + completion,
                                                   reserved=reserved)
            except Exception:
                log.exception("recording the usage of a stream failed")

        stream = relay_events(up, tap, chunk_timeout_s=self.cfg.chunk_timeout_s, clock=clock, on_end=on_end)
        return HttpReply(200, headers=[*principal.headers, ("cache-control", "no-cache")],
                         content_type="text/event-stream", stream=stream)


def _message(raw: bytes) -> str:
    """The upstream's own words for a refusal (OpenAI's error shape, FastAPI's detail, or the text)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", "replace")
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if "detail" in obj:
            return str(obj["detail"])[:500]
    return str(obj)[:200]

