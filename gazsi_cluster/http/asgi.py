"""The ASGI side of the one error mapping: FastAPI/Starlette exceptions in, our replies out.

FastAPI raises its own exceptions for bad bodies (``RequestValidationError``) and unknown routes
(Starlette's ``HTTPException``); they are translated into :mod:`gazsi_cluster.errors` at this
boundary and then answered by :func:`gazsi_cluster.http.errors.error_reply`, so a FastAPI app and
the byte-level transports give the same status and body for the same mistake.
"""

from __future__ import annotations

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
from gazsi_cluster.http.wire import HttpReply

__all__ = ["install_error_handlers", "reply_response", "to_response", "translate", "validation_error"]

_BY_STATUS: dict[int, type[GazsiError]] = {
    401: AuthenticationError, 403: PermissionDenied, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
}


def validation_error(errors: list[Any]) -> InvalidRequest:
    """A pydantic/FastAPI error list as one :class:`InvalidRequest`: the top-level field is the param."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header")]
    if first.get("type") == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request.")
    msg = first.get("msg", "invalid request")
    return InvalidRequest(f"{'.'.join(loc)}: {msg}" if loc else msg, param=loc[0] if loc else None)


def translate(exc: BaseException) -> BaseException:
    """FastAPI's and Starlette's exceptions as ours; anything else unchanged."""
    if isinstance(exc, RequestValidationError):
        return validation_error(list(exc.errors()))
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
