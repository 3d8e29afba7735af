"""The gateway's direct listener without an ASGI framework on the hot path (issue 14).

Every gateway replica serves the public API on ``gateway.port`` beside Serve's proxy. Through
uvicorn and FastAPI one replica forwarded ~4,000 req/s on the H200 while the edge behind it served
42,000: the convenience path was the bottleneck. Here the two data routes, ``POST /v1/embeddings`` and
``GET /inference``, are checked and forwarded by :class:`DirectGateway` on the same
:class:`~gazsi_cluster.http.listener.HttpListener` the edges' fast front uses (its limits, its TLS);
every other route (models, ``/v1/route``, admin, health, metrics) goes to the gateway's FastAPI app
in this process (:func:`~gazsi_cluster.http.asgi.call_asgi`), so the API, the error bodies and the
metrics are the same as on Serve's proxy.

>>> direct = DirectGateway(gateway, create_gateway_app(gateway))              # doctest: +SKIP
>>> listener = HttpListener(direct.handle, settings.limits, ssl_context=ctx)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI
from pydantic import ValidationError

from gazsi_cluster.gateway.core import Gateway
from gazsi_cluster.http.asgi import call_asgi, translate
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import HttpReply, HttpRequest
from gazsi_cluster.llm.protocol import LLM_ROUTES
from gazsi_cluster.protocol import EmbeddingRequest, invalid_request, plain_embedding_request

__all__ = ["DirectGateway"]


def _embedding_request(body: bytes) -> tuple[str, int | None]:
    """``(model, dimensions)`` of a body validated as FastAPI does for the app's route, so both paths give the
    same 400 for the same body (the common shape is checked without pydantic: :func:`plain_embedding_request`)."""
    if not body:
        raise invalid_request([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid_request([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}]) from None
    if plain_embedding_request(data):
        return data["model"], data.get("dimensions")
    if type(data) is not dict:  # FastAPI's words for a body that is not an object (pydantic's name the model)
        raise invalid_request([{"type": "model_attributes_type", "loc": ("body",),
                                "msg": "Input should be a valid dictionary or object to extract fields from"}])
    try:
        req = EmbeddingRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid_request([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    return req.model, req.dimensions


class DirectGateway:
    """``handle`` answers one request: the data routes here, the rest through ``app``."""

    def __init__(self, gateway: Gateway, app: FastAPI) -> None:
        self.gateway, self.app = gateway, app
        # The app's request metrics (route, status, sent, received), so /metrics counts both paths.
        self.observe: Any = app.state.observe

    async def handle(self, request: HttpRequest) -> HttpReply:
        if request.path == "/v1/embeddings" and request.method == "POST":
            route, run = "/v1/embeddings", self._embeddings
        elif request.path == "/inference" and request.method in ("GET", "HEAD"):
            route, run = "/inference", self._inference
        elif request.path in LLM_ROUTES and request.method == "POST":
            # Streams are relayed here, not through the app: call_asgi gathers a whole answer (issue 16).
            route, run = request.path, self._llm
        else:
            return await call_asgi(self.app, request)
        try:
            reply = await run(request)
        except Exception as exc:  # one error mapping, as the app's handlers
            reply = error_reply(translate(exc))
        self.observe(route, reply.status, time.perf_counter(), request.received)
        return reply

    async def _embeddings(self, request: HttpRequest) -> HttpReply:
        model, dimensions = _embedding_request(request.body)
        return await self.gateway.embeddings(model, dimensions, request.body, request.headers)

    async def _llm(self, request: HttpRequest) -> HttpReply:
        return await self.gateway.llm.handle(request.path, request.body, request.headers, request.received)

    async def _inference(self, request: HttpRequest) -> HttpReply:
        d = None
        for key, value in parse_qsl(request.query, keep_blank_values=True):
            if key == "d":
                d = value  # the last one wins, as in Starlette's QueryParams
        return await self.gateway.inference(d, request.headers)
