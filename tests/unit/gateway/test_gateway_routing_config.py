"""The gateway's routing client obeys ``control_plane.retry_attempts`` and its timeouts (issue 13:
config keys that nothing read are wired)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import load_settings
from gazsi_cluster.gateway import Gateway, create_gateway_app
from gazsi_cluster.routing import NodeEntry, RoutingTable

pytestmark = pytest.mark.unit
MODEL = "all-MiniLM-L6-v2"
BODY = {"model": MODEL, "input": "hello"}


def two_edges(first: str, second: str) -> RoutingTable:
    return RoutingTable(1, 1, (NodeEntry("e1", first, models=(MODEL,)), NodeEntry("e2", second, models=(MODEL,))))


def refusing_then_ok(seen: list[int]) -> httpx.MockTransport:
    """Edge 127.0.0.1:1 refuses connections; 127.0.0.1:2 answers."""
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.port or 0)
        if request.url.port == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"object": "list", "data": [], "model": MODEL})
    return httpx.MockTransport(handler)


@pytest.mark.parametrize(("attempts", "status"), [(1, None), (2, 200)])
async def test_retry_attempts_bounds_failover(tmp_path, attempts: int, status: int | None) -> None:
    seen: list[int] = []
    settings = load_settings(data_dir=tmp_path, auth={"enabled": False},
                             control_plane={"retry_attempts": attempts})
    table = two_edges("http://127.0.0.1:1", "http://127.0.0.1:2")
    # p2c picks at random: only requests that tried the refusing edge first say anything about failover.
    http = httpx.AsyncClient(transport=refusing_then_ok(seen))
    gw = Gateway(settings, authorizer=AllowAll(), table=lambda: table, http=http)
    assert gw.routing.attempts == attempts
    app = httpx.ASGITransport(app=create_gateway_app(gw), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=app, base_url="http://gw") as c:
        for _ in range(40):
            seen.clear()
            r = await c.post("/v1/embeddings", json=BODY)
            if seen[0] != 1:
                continue  # the answering edge came first: failover not exercised on this request
            assert len(seen) == min(attempts, 2)
            if status is None:
                assert r.status_code >= 500
                assert r.json()["error"]["message"]
            else:
                assert r.status_code == status
            break
        else:
            pytest.fail("the policy never picked the refusing edge first")
    await gw.aclose()
    await http.aclose()


async def test_request_timeout_bounds_a_silent_edge(tmp_path) -> None:
    """An edge that accepts and never answers costs request_timeout_s per attempt, not the 10 s default."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    settings = load_settings(data_dir=tmp_path, auth={"enabled": False},
                             control_plane={"retry_attempts": 1, "request_timeout_s": 0.3})
    table = RoutingTable(1, 1, (NodeEntry("e1", f"http://127.0.0.1:{port}", models=(MODEL,)),))
    gw = Gateway(settings, authorizer=AllowAll(), table=lambda: table)  # the real aiohttp sender
    app = httpx.ASGITransport(app=create_gateway_app(gw), raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=app, base_url="http://gw", timeout=30) as c:
            t0 = time.perf_counter()
            r = await c.post("/v1/embeddings", json=BODY)
            took = time.perf_counter() - t0
        assert r.status_code >= 500
        assert r.json()["error"]["message"]
        assert took < 3.0, f"a 0.3 s request timeout took {took:.1f} s"
    finally:
        await gw.aclose()
        silent.close()
