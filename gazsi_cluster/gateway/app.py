"""The gateway's HTTP surface: the public API of the edges, plus routing and admin routes.

``POST /v1/embeddings`` and ``GET /inference`` are validated here and forwarded to an edge;
``GET /v1/route`` tells a client which edge to use directly (the CDN path); ``/admin/keys`` and
``/admin/usage`` come from the auth package; ``/healthz``, ``/readyz``, ``/metrics`` report on
the gateway itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Header, Query, Request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.responses import Response

from gazsi_cluster import __version__
from gazsi_cluster.auth.admin_api import build_admin_router
from gazsi_cluster.errors import UnknownModel
from gazsi_cluster.gateway.core import Gateway
from gazsi_cluster.http.asgi import install_error_handlers, reply_response
from gazsi_cluster.http.cancellation import run_until_disconnect
from gazsi_cluster.http.middleware import BodyLimitMiddleware, TimingMiddleware
from gazsi_cluster.http.streaming import reply_or_stream
from gazsi_cluster.llm.protocol import CHAT, COMPLETIONS, ChatRequest, CompletionRequest
from gazsi_cluster.protocol import EmbeddingRequest, EmbeddingResponse, InferenceResponse, ModelList
from gazsi_cluster.routing import RouteRequest
from gazsi_cluster.tunnel import tunnelled_ids

__all__ = ["create_gateway_app"]


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def create_gateway_app(
    gateway: Gateway,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    """Build the gateway app; ``on_startup``/``on_shutdown`` own the resources around it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title="GAZSI gateway", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("gazsi_gateway_requests", "Gateway requests", ["route", "status"], registry=registry)
    latency = Histogram("gazsi_gateway_latency_seconds", "Gateway request latency", ["route"], registry=registry)

    # The labelled children, looked up once: prometheus_client's labels() took ~4 % of a direct gateway's CPU.
    # As many entries as the metrics' own label sets.
    counted: dict[tuple[str, int], Any] = {}
    timed: dict[str, Any] = {}

    def observe(route: str, status: int, sent_at: float, received_at: float) -> None:
        count = counted.get((route, status))
        if count is None:
            count = counted[(route, status)] = requests.labels(route, str(status))
        count.inc()
        timer = timed.get(route)
        if timer is None:
            timer = timed[route] = latency.labels(route)
        timer.observe(sent_at - received_at)

    app.state.observe = observe  # the direct listener's data routes count here too (gateway/direct.py)
    app.add_middleware(BodyLimitMiddleware, max_bytes=gateway.settings.limits.max_body_bytes)
    app.add_middleware(TimingMiddleware, observer=observe)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, summary="Create embeddings (OpenAI-compatible)")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return reply_response(await gateway.embeddings(body.model, body.dimensions, await request.body(),
                                                       request.headers))

    @app.get("/inference", response_model=InferenceResponse, summary="GAZSI inference endpoint")
    async def inference(
        request: Request, d: Annotated[str | None, Query(description="Text to embed")] = None
    ) -> Response:
        return reply_response(await gateway.inference(d, request.headers))

    def _llm_schema(model: type[Any]) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": model.model_json_schema()}}}}

    @app.post(CHAT, summary="Chat completions (OpenAI-compatible; stream: true for SSE)",
              openapi_extra=_llm_schema(ChatRequest))
    async def chat_completions(request: Request) -> Response:
        # Until the first byte a client that leaves cancels the routing and the edge's request (issue 16).
        reply = await run_until_disconnect(request, gateway.llm.handle(CHAT, await request.body(), request.headers))
        return reply_or_stream(reply)

    @app.post(COMPLETIONS, summary="Completions (OpenAI-compatible; stream: true for SSE)",
              openapi_extra=_llm_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await request.body()
        return reply_or_stream(await run_until_disconnect(request, gateway.llm.handle(COMPLETIONS, body,
                                                                                       request.headers)))

    @app.get("/v1/models", response_model=ModelList, summary="Models served by the cluster")
    async def models(authorization: Annotated[str | None, Header()] = None) -> Response:
        await gateway.authorizer.authorize(authorization)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "gazsi"} for m in gateway.models()]
        return _json({"object": "list", "data": data})

    @app.get("/v1/route", summary="The best edge for this client (talk to it directly)")
    async def route(
        request: Request,
        model: Annotated[str | None, Query(max_length=128)] = None,
        region: Annotated[str | None, Query(max_length=64)] = None,
        zone: Annotated[str | None, Query(max_length=64)] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        await gateway.authorizer.authorize(authorization, model=model)
        table = gateway.table()
        if model is not None and table.candidates() and not table.candidates(model):
            raise UnknownModel(f"The model `{model}` does not exist.", param="model")
        req = RouteRequest(
            model=model, region=region or request.headers.get("x-gazsi-region"),
            zone=zone or request.headers.get("x-gazsi-zone"),
            exclude=tunnelled_ids(table),  # reachable only through this gateway (issue 17): not for clients
        )
        node = gateway.policy.choose(table, req)
        return _json({"url": node.url, "node_id": node.node_id, "region": node.region, "zone": node.zone})

    admin = build_admin_router(gateway.authorizer)
    if admin is not None:
        app.include_router(admin)

    @app.get("/healthz", summary="Process is alive")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz", summary="At least one healthy edge is routable")
    async def readyz() -> Response:
        detail = gateway.status()
        auth_status = getattr(gateway.authorizer, "status", None)
        if callable(auth_status):
            detail["auth"] = auth_status()
        # Ready while requests can be routed: a restarting control plane must not take every
        # gateway out of a load balancer's rotation (routing goes on over the last table).
        detail["ready"] = detail["routable_edges"] > 0
        return _json(detail, status=200 if detail["ready"] else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        text = (generate_latest(registry) + generate_latest(gateway.routing_metrics.registry)
                + gateway.llm.metrics.render())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
