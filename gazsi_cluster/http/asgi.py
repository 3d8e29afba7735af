"""The ASGI side of the one error mapping: FastAPI/Starlette exceptions in, our replies out.

FastAPI raises its own exceptions for bad bodies (``RequestValidationError``) and unknown routes
(Starlette's ``HTTPException``); they are translated into :mod:`gazsi_cluster.errors` at this
boundary and then answered by :func:`gazsi_cluster.http.errors.error_reply`, so a FastAPI app and
the byte-level transports give the same status and body for the same mistake.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gazsi_cluster.errors import (
    AuthenticationError,
    GazsiError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
)
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import HttpReply, HttpRequest
from gazsi_cluster.protocol import invalid_request

__all__ = ["call_asgi", "install_error_handlers", "reply_response", "to_response", "translate"]

_BY_STATUS: dict[int, type[GazsiError]] = {
    401: AuthenticationError, 403: PermissionDenied, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
}


def translate(exc: BaseException) -> BaseException:
    """FastAPI's and Starlette's exceptions as ours; anything else unchanged."""
    if isinstance(exc, RequestValidationError):
        return invalid_request(list(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        cls = _BY_STATUS.get(exc.status_code, InvalidRequest)
        return cls(exc.detail if isinstance(exc.detail, str) else "request failed")
    return exc


def reply_response(reply: HttpReply) -> Response:
    """A Starlette response with the reply's status, headers and body (streams excluded)."""
    return Response(reply.body, status_code=reply.status, headers=dict(reply.headers), media_type=reply.content_type)


def to_response(exc: BaseException) -> Response:
    return reply_response(error_reply(translate(exc)))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error an app can raise through :func:`to_response`."""

    async def _handle(_request: Request, exc: Exception) -> Response:
        return to_response(exc)

    app.add_exception_handler(GazsiError, _handle)
    app.add_exception_handler(RequestValidationError, _handle)
    app.add_exception_handler(StarletteHTTPException, _handle)
    app.add_exception_handler(Exception, _handle)


async def call_asgi(app: Any, request: HttpRequest) -> HttpReply:
    """One request through an ASGI app in this process, as a reply (a byte transport's way to the app).

    The body is sent whole and the response gathered whole (the app's answers here are small JSON);
    a client that left is the transport's business, so ``receive`` never reports a disconnect.
    """
    raw_path = request.path.encode("latin-1")
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": raw_path,
        "query_string": request.query.encode("latin-1"), "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
        "client": (request.client, 0) if request.client else None, "server": None, "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # never: the body was whole
        raise AssertionError("unreachable")

    status = 500
    headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []
    content_type = "application/json"

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = int(message["status"])
            for name, value in message.get("headers", ()):
                key = name.decode("latin-1").lower()
                if key == "content-type":
                    content_type = value.decode("latin-1")
                elif key not in ("content-length", "transfer-encoding", "connection"):
                    headers.append((key, value.decode("latin-1")))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return HttpReply(status, b"".join(chunks), headers, content_type=content_type)
