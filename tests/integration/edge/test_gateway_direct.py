"""The gateway's direct listener (``DirectGateway`` on ``HttpListener``) answers as the gateway's FastAPI
app does, in front of a real edge on the ONNX CPU engine: same statuses, same error bodies, same vectors,
and its data routes are counted in the app's /metrics (issue 14)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import load_settings
from gazsi_cluster.gateway import DirectGateway, Gateway, create_gateway_app
from gazsi_cluster.http.listener import HttpListener, bind_socket
from gazsi_cluster.routing import NodeEntry, RoutingTable
from tests.support.edge import running_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "all-MiniLM-L6-v2"

# (method, path, json body or raw bytes or None)
CASES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hello through the gateway"}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": ["one", "two", "three"], "dimensions": 64}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "b64", "encoding_format": "base64"}),
    ("POST", "/v1/embeddings", b"{not json"),
    ("POST", "/v1/embeddings", b""),
    ("POST", "/v1/embeddings", {"model": MODEL}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": 5}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 0}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": True}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": None}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "x", "user": 5}),
    ("POST", "/v1/embeddings", {"model": 5, "input": "x"}),
    ("POST", "/v1/embeddings", [MODEL, "x"]),  # not an object: FastAPI's message, on both paths
    ("POST", "/v1/embeddings", b"null"),
    ("POST", "/v1/embeddings", b"5"),
    ("POST", "/v1/embeddings", {"model": "no-such-model", "input": "x"}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": ""}),  # the edge refuses it: relayed as is
    ("POST", "/v1/embeddings", b"x" * 70_000),  # over max_body_bytes
    ("GET", "/v1/embeddings", None),
    ("GET", "/inference?d=hello%20gazsi", None),
    ("GET", "/inference?d=first&d=last", None),
    ("GET", "/inference", None),
    ("GET", "/inference?d=", None),
    ("GET", "/v1/models", None),
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
    ("GET", "/nope", None),
]


@pytest.fixture
async def paths(edge_data_dir) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(direct listener client, app client) in front of one real ONNX edge."""
    limits = {"max_body_bytes": 65_536}
    async with running_node(edge_data_dir, dataplane="asgi", limits=limits) as node:
        settings = load_settings(data_dir=edge_data_dir, auth={"enabled": False}, limits=limits)
        table = RoutingTable(1, 1, (NodeEntry("e1", node.url, models=(MODEL,)),))
        gateway = Gateway(settings, authorizer=AllowAll(), table=lambda: table)
        listener = HttpListener(DirectGateway(gateway, create_gateway_app(gateway)).handle, settings.limits)
        sock = bind_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        await listener.start(sock)
        app = httpx.ASGITransport(app=create_gateway_app(gateway), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as direct, \
                    httpx.AsyncClient(transport=app, base_url="http://gw", timeout=60) as via_app:
                yield direct, via_app
        finally:
            await listener.stop(5)
            await gateway.aclose()


async def _send(client: httpx.AsyncClient, method: str, path: str, body: Any) -> httpx.Response:
    if body is None:
        return await client.request(method, path)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.request(method, path, content=raw, headers={"content-type": "application/json"})


async def test_direct_listener_answers_as_the_app(paths) -> None:
    direct, via_app = paths
    for method, path, body in CASES:
        a = await _send(direct, method, path, body)
        b = await _send(via_app, method, path, body)
        where = f"{method} {path} {str(body)[:40]}"
        assert a.status_code == b.status_code, where
        assert a.headers["content-type"].split(";")[0] == b.headers["content-type"].split(";")[0], where
        if a.status_code >= 400:
            assert a.json() == b.json(), where  # the one error mapping on both paths
            assert a.json()["error"]["message"], where
        elif path.startswith("/v1/embeddings"):
            va = [d["embedding"] for d in a.json()["data"]]
            vb = [d["embedding"] for d in b.json()["data"]]
            if isinstance(va[0], str):
                assert va == vb, where
            else:
                assert np.allclose(np.array(va), np.array(vb), atol=1e-6), where
            assert a.json()["usage"] == b.json()["usage"], where
        elif path.startswith("/inference"):
            ja, jb = a.json(), b.json()
            assert (ja["input"], ja["tokens"]) == (jb["input"], jb["tokens"]), where
            assert np.allclose(ja["embedding_sample"], jb["embedding_sample"], atol=1e-6), where
        elif path != "/readyz":
            assert a.json() == b.json(), where
    # The real edge embedded it: a unit vector of the model's size.
    r = await direct.post("/v1/embeddings", json={"model": MODEL, "input": "norm"})
    vec = np.array(r.json()["data"][0]["embedding"])
    assert vec.shape == (384,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-4


async def test_direct_data_routes_are_counted_in_the_gateway_metrics(paths) -> None:
    direct, _ = paths
    for i in range(3):
        assert (await direct.post("/v1/embeddings", json={"model": MODEL, "input": f"count {i}"})).status_code == 200
    assert (await direct.get("/inference", params={"d": "count"})).status_code == 200
    assert (await direct.get("/inference")).status_code == 400
    text = (await direct.get("/metrics")).text
    assert 'gazsi_gateway_requests_total{route="/v1/embeddings",status="200"} 3.0' in text
    assert 'gazsi_gateway_requests_total{route="/inference",status="200"} 1.0' in text
    assert 'gazsi_gateway_requests_total{route="/inference",status="400"} 1.0' in text
