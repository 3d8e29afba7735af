"""One exception tree for the whole project.

    GazsiError                       root; carries keyword context for logs and error bodies
    ├── InvalidRequest               400  bad input (param names the offending field)
    │   ├── PayloadTooLarge          413
    │   ├── TooManyInputs            400
    │   ├── InputTooLong             400
    │   ├── HeadersTooLarge          431  header section too big or too many fields
    │   ├── RequestTimeout           408  headers not received in time (slowloris)
    │   ├── MethodNotAllowed         405  the route exists, the method does not
    │   └── UnknownModel             404  (OpenAI answers model_not_found with 404)
    ├── NotFound                     404
    │   └── UnknownNode              404  heartbeat from a node the control plane does not know
    ├── Conflict                     409  e.g. a node id already held by a live node
    ├── AuthenticationError          401  missing, malformed, unknown, expired or revoked key
    │   ├── KeyExpired               401  the key's expiry passed (code api_key_expired)
    │   └── KeyRevoked               401  revoked or rotated away (code api_key_revoked)
    ├── PermissionDenied             403  key lacks the scope
    │   └── ModelNotAllowed          403  the key may not use this model (code model_not_allowed)
    ├── RateLimited                  429  + Retry-After (per-key limits and quotas)
    │   └── QuotaExceeded            429  a token budget (day or month) used up (code insufficient_quota)
    ├── Overloaded                   429  + Retry-After (admission queue full)
    │   └── TooManyConnections       429  one client address holds too many connections
    ├── DeadlineExceeded             504  request deadline passed before its batch ran
    ├── ServiceUnavailable           503  not ready, draining, dependency down
    │   ├── NoHealthyNode            503
    │   └── TunnelClosed             503  the reverse tunnel to a node is gone (or never came up)
    ├── ClientDisconnected           499  the client went away; its work was cancelled
    ├── EngineError                  500  inference failed; the batch's requests all get it
    ├── UpstreamError                502  an LLM upstream (or the edge before it) failed before its first byte
    │   └── UpstreamTimeout          504  no first byte, or silence between chunks, past the configured limit
    └── ConfigError                  —    raised at start-up, never reaches HTTP

Code elsewhere raises these, and translates foreign exceptions at the boundary with
``raise Ours(...) from exc``. Exactly one function (:func:`gazsi_cluster.http.errors.error_reply`)
turns them into HTTP.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "ClientDisconnected",
    "ConfigError",
    "Conflict",
    "DeadlineExceeded",
    "EngineError",
    "GazsiError",
    "HeadersTooLarge",
    "InputTooLong",
    "InvalidRequest",
    "KeyExpired",
    "KeyRevoked",
    "MethodNotAllowed",
    "ModelNotAllowed",
    "NoHealthyNode",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "TooManyConnections",
    "TooManyInputs",
    "TunnelClosed",
    "UnknownModel",
    "UnknownNode",
    "UpstreamError",
    "UpstreamTimeout",
]


class GazsiError(Exception):
    """Root of every error this project raises on purpose.

    ``status`` and ``error_type`` say how the error looks on the wire; ``code`` is the
    machine-readable OpenAI-style code; ``context`` holds keyword details for logs.
    """

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.context = context

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.context.items())
        return f"{type(self).__name__}({self.message!r}{extra})"


class InvalidRequest(GazsiError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class TooManyInputs(InvalidRequest):
    code = "too_many_inputs"


class InputTooLong(InvalidRequest):
    code = "input_too_long"


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "request_header_fields_too_large"


class RequestTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class UnknownModel(InvalidRequest):
    status = 404
    code = "model_not_found"


class NotFound(GazsiError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class UnknownNode(NotFound):
    code = "unknown_node"


class Conflict(GazsiError):
    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class AuthenticationError(GazsiError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class KeyExpired(AuthenticationError):
    code = "api_key_expired"


class KeyRevoked(AuthenticationError):
    code = "api_key_revoked"


class PermissionDenied(GazsiError):
    status = 403
    error_type = "permission_error"
    code = "insufficient_scope"


class ModelNotAllowed(PermissionDenied):
    code = "model_not_allowed"


class _RetryableError(GazsiError):
    """An error after which the client should come back later; ``retry_after`` is in seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after = max(0.0, retry_after)


class RateLimited(_RetryableError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, retry_after=retry_after, **context)
        self.headers = headers or {}


class QuotaExceeded(RateLimited):
    code = "insufficient_quota"


class Overloaded(_RetryableError):
    status = 429
    error_type = "server_overloaded"
    code = "overloaded"


class TooManyConnections(Overloaded):
    code = "too_many_connections"


class ServiceUnavailable(_RetryableError):
    status = 503
    error_type = "service_unavailable"
    code = "unavailable"


class NoHealthyNode(ServiceUnavailable):
    code = "no_healthy_node"


class TunnelClosed(ServiceUnavailable):
    code = "tunnel_closed"


class DeadlineExceeded(GazsiError):
    status = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"


class ClientDisconnected(GazsiError):
    status = 499
    error_type = "client_closed_request"
    code = "client_disconnected"


class EngineError(GazsiError):
    status = 500
    error_type = "server_error"
    code = "engine_error"


class UpstreamError(GazsiError):
    """The node-local LLM server failed; before the first byte a gateway retries another node on this."""

    status = 502
    error_type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout_error"
    code = "upstream_timeout"


class ConfigError(GazsiError):
    """Invalid configuration; raised at start-up."""

    code = "config_error"
