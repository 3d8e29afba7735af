"""The ASGI side of the one error mapping: FastAPI/Starlette exceptions in, our replies out.

FastAPI raises its own exceptions for bad bodies (``RequestValidationError``) and unknown routes
(Starlette's ``HTTPException``); they are translated into :mod:`gazsi_cluster.errors` at this
boundary and then answered by :func:`gazsi_cluster.http.errors.error_reply`, so a FastAPI app and
the byte-level transports give the same status and body for the same mistake.
"""

from __future__ import annotations

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
from gazsi_cluster.http.wire import HttpReply
from gazsi_cluster.protocol import invalid_request

__all__ = ["install_error_handlers", "reply_response", "to_response", "translate"]

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
