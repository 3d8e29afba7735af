"""Errors become HTTP here and nowhere else.

``to_response`` maps any exception to an OpenAI-shaped body ``{"error": {message, type, param,
code}}`` with the right status and headers; ``install_error_handlers`` wires it into a FastAPI
app so validation errors, unknown routes and unexpected crashes take the same shape.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gazsi_cluster.errors import GazsiError, RateLimited, _RetryableError

__all__ = ["error_body", "install_error_handlers", "to_response"]

log = logging.getLogger(__name__)

_STARLETTE_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _validation_param(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header")]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    msg = first.get("msg", "invalid request")
    # The top-level field is the param (OpenAI style); the full path stays in the message.
    param = loc[0] if loc else None
    return (f"{'.'.join(loc)}: {msg}" if loc else msg), param


def to_response(exc: BaseException) -> Response:
    """Map an exception to its HTTP response (the project's single error-to-HTTP function)."""
    if isinstance(exc, GazsiError):
        headers: dict[str, str] = {}
        if isinstance(exc, _RetryableError):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, RateLimited):
            headers.update(exc.headers)
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return _json(exc.status, error_body(exc.message, exc.error_type, exc.param, exc.code), headers)
    if isinstance(exc, RequestValidationError):
        message, param = _validation_param(list(exc.errors()))
        return _json(400, error_body(message, "invalid_request_error", param, "invalid_request"))
    if isinstance(exc, StarletteHTTPException):
        kind = _STARLETTE_TYPES.get(exc.status_code, "invalid_request_error")
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return _json(exc.status_code, error_body(detail, kind, None, None), dict(exc.headers or {}))
    # Never leak internals: the log gets the stack, the client a generic message.
    log.exception("unhandled error", exc_info=exc)
    return _json(500, error_body("The server had an error while processing your request.", "server_error"))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error an app can raise through :func:`to_response`."""

    async def _handle(_request: Request, exc: Exception) -> Response:
        return to_response(exc)

    app.add_exception_handler(GazsiError, _handle)
    app.add_exception_handler(RequestValidationError, _handle)
    app.add_exception_handler(StarletteHTTPException, _handle)
    app.add_exception_handler(Exception, _handle)
