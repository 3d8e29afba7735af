from __future__ import annotations

import orjson
import pytest

from gazsi_cluster import errors
from gazsi_cluster.http.asgi import to_response

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("exc", "status", "etype"),
    [
        (errors.InvalidRequest("bad", param="input"), 400, "invalid_request_error"),
        (errors.PayloadTooLarge("big"), 413, "invalid_request_error"),
        (errors.UnknownModel("nope", param="model"), 404, "invalid_request_error"),
        (errors.AuthenticationError("who"), 401, "authentication_error"),
        (errors.PermissionDenied("no"), 403, "permission_error"),
        (errors.RateLimited("slow down", retry_after=2.5), 429, "rate_limit_error"),
        (errors.Overloaded("full", retry_after=1), 429, "server_overloaded"),
        (errors.NoHealthyNode("none"), 503, "service_unavailable"),
        (errors.DeadlineExceeded("late"), 504, "timeout_error"),
        (errors.EngineError("boom"), 500, "server_error"),
    ],
)
def test_each_error_maps_to_its_status_and_openai_body(exc, status, etype) -> None:
    r = to_response(exc)
    body = orjson.loads(r.body)
    assert r.status_code == status
    assert body["error"]["type"] == etype
    assert body["error"]["message"] == exc.message
    assert body["error"]["param"] == exc.param


def test_retryable_errors_carry_retry_after_rounded_up() -> None:
    assert to_response(errors.RateLimited("x", retry_after=2.5)).headers["retry-after"] == "3"
    assert to_response(errors.Overloaded("x", retry_after=0.01)).headers["retry-after"] == "1"
    assert "retry-after" not in to_response(errors.InvalidRequest("x")).headers


def test_rate_limit_headers_pass_through() -> None:
    r = to_response(errors.RateLimited("x", headers={"X-RateLimit-Limit-Requests": "60"}))
    assert r.headers["x-ratelimit-limit-requests"] == "60"


def test_401_asks_for_bearer() -> None:
    assert to_response(errors.AuthenticationError("x")).headers["www-authenticate"] == "Bearer"


def test_unexpected_errors_leak_nothing() -> None:
    r = to_response(RuntimeError("secret internal path /etc/passwd"))
    assert r.status_code == 500
    assert b"passwd" not in r.body
