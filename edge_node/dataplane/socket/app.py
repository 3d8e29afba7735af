"""The socket data plane: a FastAPI app in front of an :class:`EdgeRuntime`.

Routes: ``POST /v1/embeddings`` (OpenAI), ``GET /inference?d=`` (GAZSI), ``GET /v1/models``,
``/healthz``, ``/readyz``, ``/metrics``, and GAZSI's static ``/index.`` and ``/contacts.``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Header, Query, Request
from starlette.responses import Response

from edge_node.dataplane.gazsi_json import sample_json
from edge_node.runtime import EdgeRuntime
from edge_node.service import EmbedOutcome, Timing, openai_payload, shape_vectors
from gazsi_cluster import __version__
from gazsi_cluster.auth import Principal
from gazsi_cluster.auth.admin_api import build_admin_router
from gazsi_cluster.errors import InvalidRequest
from gazsi_cluster.http.asgi import install_error_handlers
from gazsi_cluster.http.cancellation import run_until_disconnect
from gazsi_cluster.http.middleware import BodyLimitMiddleware, TimingMiddleware
from gazsi_cluster.protocol import EmbeddingRequest, EmbeddingResponse, InferenceResponse, ModelList

from .pages import CONTACTS_HTML, INDEX_HTML

__all__ = ["create_app"]

_JSON = "application/json"


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def create_app(runtime: EdgeRuntime, *, manage_lifespan: bool = True) -> FastAPI:
    """Build the edge app. With ``manage_lifespan`` the app starts and stops ``runtime`` itself."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifespan:
            await runtime.start()
        try:
            yield
        finally:
            if manage_lifespan:
                await runtime.stop()

    app = FastAPI(title="GAZSI edge node", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    install_error_handlers(app)
    admin_router = build_admin_router(runtime.authorizer)
    if admin_router is not None:
        app.include_router(admin_router)
    metrics = runtime.metrics
    timing_enabled = runtime.settings.edge.timing_header

    def observe(route: str, status: int, sent_at: float, received_at: float) -> None:
        metrics.requests.labels(route, str(status)).inc()
        metrics.stage_latency.labels("total").observe(sent_at - received_at)

    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.settings.limits.max_body_bytes)
    app.add_middleware(TimingMiddleware, observer=observe)

    def start_timing(request: Request) -> Timing:
        t0 = request.scope.get("state", {}).get("t0")
        return Timing(received=t0) if t0 else Timing()

    def finish(
        timing: Timing, outcome: EmbedOutcome, want_header: bool, principal: Principal
    ) -> dict[str, str]:
        timing.serialized = time.perf_counter()
        for stage, seconds in timing.stages().items():
            if stage != "total":
                metrics.stage_latency.labels(stage).observe(seconds)
        metrics.tokens.inc(outcome.prompt_tokens)
        metrics.inputs.inc(len(outcome.vectors))
        metrics.queue_depth.set(runtime.service.batcher.queue_depth)
        headers = dict(principal.headers)
        if outcome.cache is not None:
            headers["X-Gazsi-Cache"] = outcome.cache
        if want_header and timing_enabled:
            headers["Server-Timing"] = timing.header()
        return headers

    def use_cache(cache_control: str | None) -> bool:
        return "no-cache" not in (cache_control or "").lower()

    async def authorize(authorization: str | None, model: str | None) -> Principal:
        return await runtime.authorizer.authorize(authorization, model=model)

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        summary="Create embeddings (OpenAI-compatible)",
    )
    async def embeddings(
        body: EmbeddingRequest,
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_gazsi_timing: Annotated[str | None, Header()] = None,
        cache_control: Annotated[str | None, Header()] = None,
    ) -> Response:
        timing = start_timing(request)
        principal = await authorize(authorization, body.model)
        service = runtime.service
        service.check_model(body.model)
        service.check_dimensions(body.dimensions)
        outcome = await run_until_disconnect(
            request, service.embed(body.input, timing, use_cache=use_cache(cache_control))
        )
        vectors = shape_vectors(outcome.vectors, body.dimensions)
        payload = openai_payload(
            vectors, model=service.model_id, prompt_tokens=outcome.prompt_tokens,
            encoding_format=body.encoding_format,
        )
        await runtime.authorizer.record_usage(principal, model=service.model_id, tokens=outcome.prompt_tokens)
        headers = finish(timing, outcome, x_gazsi_timing == "1", principal)
        return _json(payload, headers=headers)

    @app.get("/inference", response_model=InferenceResponse, summary="GAZSI inference endpoint")
    async def inference(
        request: Request,
        d: Annotated[str | None, Query(description="Text to embed (URL-encoded)")] = None,
        authorization: Annotated[str | None, Header()] = None,
        x_gazsi_timing: Annotated[str | None, Header()] = None,
        cache_control: Annotated[str | None, Header()] = None,
    ) -> Response:
        timing = start_timing(request)
        if not d:
            raise InvalidRequest("query parameter d must hold the text to embed", param="d")
        service = runtime.service
        principal = await authorize(authorization, service.model_id)
        outcome = await run_until_disconnect(request, service.embed(d, timing, use_cache=use_cache(cache_control)))
        payload = {
            "input": d,
            "tokens": outcome.prompt_tokens,
            # Fixed 6 decimals, shared with the GPU data plane so both bodies are byte-identical.
            "embedding_sample": orjson.Fragment(sample_json(outcome.vectors[0][:3])),
            "inference_time_us": outcome.inference_us,
            "batch_size": outcome.batch_size,
        }
        await runtime.authorizer.record_usage(principal, model=service.model_id, tokens=outcome.prompt_tokens)
        headers = finish(timing, outcome, x_gazsi_timing == "1", principal)
        return _json(payload, headers=headers)

    @app.get("/v1/models", response_model=ModelList, summary="Models served by this node")
    async def models(authorization: Annotated[str | None, Header()] = None) -> Response:
        principal = await authorize(authorization, None)
        model_id = runtime.settings.engine.model
        return _json({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": runtime.created, "owned_by": "gazsi"}
        ]}, headers=dict(principal.headers))

    @app.get("/index.", include_in_schema=False)
    async def index_page() -> Response:
        return Response(INDEX_HTML, media_type="text/html; charset=utf-8")

    @app.get("/contacts.", include_in_schema=False)
    async def contacts_page() -> Response:
        return Response(CONTACTS_HTML, media_type="text/html; charset=utf-8")

    @app.get("/healthz", summary="Process is alive")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz", summary="Model loaded and batcher running")
    async def readyz() -> Response:
        detail = runtime.readiness()
        return _json(detail, status=200 if detail["ready"] else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        if runtime.ready:
            metrics.queue_depth.set(runtime.service.batcher.queue_depth)
            metrics.in_flight.set(runtime.service.batcher.in_flight_requests)
        # Auth and response-cache metrics live in registries of their own; one scrape shows all.
        parts = [metrics.render()]
        auth_metrics = getattr(runtime.authorizer, "metrics", None)
        if auth_metrics is not None:
            parts.append(auth_metrics.render())
        if runtime.response_cache is not None:
            parts.append(runtime.response_cache.render())
        return Response(b"".join(parts), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
