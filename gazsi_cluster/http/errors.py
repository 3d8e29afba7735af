"""Errors become HTTP here and nowhere else.

:func:`error_reply` maps any exception to an OpenAI-shaped body ``{"error": {message, type, param,
code}}`` with the right status and headers. Every transport calls it (the ASGI apps through
:mod:`gazsi_cluster.http.asgi`, which first translates FastAPI's and Starlette's own exceptions
into ours); nothing else builds an error body.

>>> from gazsi_cluster.errors import Overloaded
>>> error_reply(Overloaded("busy", retry_after=2)).status
429
"""

from __future__ import annotations

import logging
import math

import orjson

from gazsi_cluster.errors import AuthenticationError, GazsiError, RateLimited, _RetryableError
from gazsi_cluster.http.wire import HttpReply

__all__ = ["error_body", "error_reply"]

log = logging.getLogger(__name__)

_INTERNAL = b'{"error":{"message":"The server had an error while processing your request.",' \
            b'"type":"server_error","param":null,"code":null}}'


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def error_reply(exc: BaseException) -> HttpReply:
    """The reply for ``exc`` (the project's single error-to-HTTP function)."""
    if isinstance(exc, GazsiError):
        headers: list[tuple[str, str]] = []
        if isinstance(exc, _RetryableError):
            headers.append(("Retry-After", str(max(1, math.ceil(exc.retry_after)))))
        if isinstance(exc, RateLimited):
            headers.extend(exc.headers.items())
        if isinstance(exc, AuthenticationError):
            headers.append(("WWW-Authenticate", "Bearer"))
        return HttpReply(exc.status, error_body(exc.message, exc.error_type, exc.param, exc.code), headers)
    # Never leak internals: the log gets the stack, the client a generic message.
    log.error("unhandled error", exc_info=exc)
    return HttpReply(500, _INTERNAL)
