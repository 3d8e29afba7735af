"""The ASGI transport: a FastAPI app for operators (readiness, metrics, key admin, OpenAPI) and, when it
is the node's data plane, the data routes, each of which hands the request to the one pipeline.

The data routes do no validation, auth or error formatting of their own: they turn Starlette's request
into an :class:`~gazsi_cluster.http.wire.HttpRequest`, await :meth:`EdgePipeline.handle` (cancelled if
the client disconnects) and send the reply's status, headers and body. The request body's schema is
declared for the OpenAPI document only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from edge_node.pipeline import EdgePipeline
from edge_node.transports.base import OpsSource
from gazsi_cluster import __version__
from gazsi_cluster.auth.admin_api import build_admin_router
from gazsi_cluster.http.asgi import install_error_handlers, reply_response
from gazsi_cluster.http.cancellation import run_until_disconnect
from gazsi_cluster.http.middleware import BodyLimitMiddleware
from gazsi_cluster.http.streaming import StreamReply
from gazsi_cluster.http.wire import HttpRequest
from gazsi_cluster.llm.protocol import ChatRequest, CompletionRequest
from gazsi_cluster.protocol import EmbeddingRequest, EmbeddingResponse, InferenceResponse, ModelList

if TYPE_CHECKING:
    from edge_node.transports.base import TransportHost
    from gazsi_cluster.http.server import RunningServer

__all__ = ["AsgiTransport", "OpsSource", "create_app"]

_METRICS = "text/plain; version=0.0.4; charset=utf-8"


def _schema(model: type[Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _data_routes(app: FastAPI, pipeline: EdgePipeline) -> None:
    async def endpoint(request: Request) -> Response:
        received = time.perf_counter()
        body = await request.body()
        req = HttpRequest(request.method, request.url.path, request.url.query,
                          {k: v for k, v in request.headers.items()}, body,
                          request.client.host if request.client else None, received)
        reply = await run_until_disconnect(request, pipeline.handle(req))
        if reply.stream is not None:
            return StreamReply(reply)  # a disconnect cancels the stream (and its upstream) at once
        return reply_response(reply)

    app.add_api_route("/v1/embeddings", endpoint, methods=["POST"], summary="Create embeddings (OpenAI-compatible)",
                      openapi_extra=_schema(EmbeddingRequest), responses={200: {"model": EmbeddingResponse}})
    app.add_api_route("/inference", endpoint, methods=["GET", "HEAD"], summary="GAZSI inference endpoint",
                      responses={200: {"model": InferenceResponse}}, openapi_extra={"parameters": [
                          {"name": "d", "in": "query", "required": True, "description": "Text to embed (URL-encoded)",
                           "schema": {"type": "string"}}]})
    app.add_api_route("/v1/chat/completions", endpoint, methods=["POST"],
                      summary="Chat completions (OpenAI-compatible), relayed to the model's node-local server",
                      openapi_extra=_schema(ChatRequest))
    app.add_api_route("/v1/completions", endpoint, methods=["POST"],
                      summary="Completions (OpenAI-compatible), relayed to the model's node-local server",
                      openapi_extra=_schema(CompletionRequest))
    app.add_api_route("/v1/models", endpoint, methods=["GET", "HEAD"], summary="Models served by this node",
                      responses={200: {"model": ModelList}})
    for path in ("/index.", "/contacts."):
        app.add_api_route(path, endpoint, methods=["GET", "HEAD"], include_in_schema=False)


def create_app(ops: OpsSource, pipeline: EdgePipeline | None = None, *,
               lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """The node's FastAPI app; with ``pipeline`` it also serves the data routes (the ASGI data plane)."""
    app = FastAPI(title="GAZSI edge node", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: ops.max_body_bytes)
    admin_router = build_admin_router(ops.authorizer)
    if admin_router is not None:
        app.include_router(admin_router)
    if pipeline is not None:
        _data_routes(app, pipeline)

    @app.get("/healthz", summary="Process is alive")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz", summary="Model loaded, listeners up, not draining")
    async def readyz() -> Response:
        detail = ops.readiness()
        return Response(orjson.dumps(detail), status_code=200 if detail.get("ready") else 503,
                        media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(ops.render_metrics(), media_type=_METRICS)

    return app


class AsgiTransport:
    """The node's whole HTTP surface in this process: uvicorn with the hardened protocol and TLS."""

    name = "asgi"

    def __init__(self, node: TransportHost) -> None:
        self.node = node
        self.server: RunningServer | None = None
        self.port = 0
        self._protocol: Any = None

    async def start(self) -> None:
        from gazsi_cluster.http.hardening import listener_options
        from gazsi_cluster.http.server import start_server

        node, edge = self.node, self.node.settings.edge
        options = listener_options(node.settings.limits, edge.tls)
        self._protocol = options["http"]
        self.server = await start_server(create_app(node, node.pipeline), edge.host, edge.port, **options)
        self.port = self.server.port

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.server is not None:
            await self.server.stop(timeout_s)

    def apply_limits(self, limits: Any) -> None:
        """New connections and requests use ``limits`` (the hardened protocol reads its class attribute)."""
        if self._protocol is not None:
            self._protocol.limits = limits

    async def wait_ready(self) -> None:
        """Serving as soon as :meth:`start` returned."""

    def check_health(self) -> None:
        from gazsi_cluster.errors import ServiceUnavailable

        if self.server is None or not self.server.alive:
            raise ServiceUnavailable("the HTTP listener stopped", retry_after=1)

    def readiness(self) -> dict[str, Any]:
        return {"listener": "up" if self.server is not None and self.server.alive else "down"}

    @property
    def ready(self) -> bool:
        return self.server is not None and self.server.alive
