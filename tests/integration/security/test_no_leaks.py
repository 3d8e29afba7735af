"""Error paths leak no key hashes, internal addresses or stack traces; admin needs admin scope; no CORS."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings
from gazsi_cluster.gateway import Gateway, create_gateway_app
from gazsi_cluster.routing import NodeEntry, RoutingTable
from tests.support.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
MODEL = "all-MiniLM-L6-v2"
# The only edge in the gateway's table: a closed loopback port. Its address must never show up in answers.
PORT = free_port()
INTERNAL = f"127.0.0.1:{PORT}"


@pytest.fixture
async def apps(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    settings = load_settings(data_dir=str(tmp_path), engine={"backend": "fake"}, auth={"key_env": "test"},
                             control_plane={"connect_timeout_s": 0.2, "request_timeout_s": 0.5, "retry_attempts": 1})
    auth = build_authorizer(settings)
    engine = FakeEngine()
    node = EdgeNode(settings.model_copy(update={"edge": settings.edge.model_copy(update={"dataplane": "asgi", "port": 0})}),
                    engine=engine, authorizer=auth)
    await node.start()
    assert node.runtime is not None
    await node.runtime.wait_loaded()
    table = RoutingTable(1, 1, (NodeEntry("edge-x", f"http://{INTERNAL}", models=(MODEL,)),))
    gateway = Gateway(settings, authorizer=auth, table=lambda: table)
    gw_app = create_gateway_app(gateway)
    user = await auth.admin.create(name="user")
    admin = await auth.admin.create(name="ops", admin=True)
    try:
        async with httpx.AsyncClient(base_url=node.url) as e, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=gw_app, raise_app_exceptions=False),
                                  base_url="http://gw") as g:
            yield {"edge": e, "gw": g, "auth": auth, "engine": engine, "user": user.key, "admin": admin.key}
    finally:
        await gateway.aclose()
        await node.stop()


def _h(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def test_error_paths_leak_nothing(apps: dict[str, Any]) -> None:
    hashes = [r.key_hash for r in await apps["auth"].store.list_keys()]
    assert hashes
    answers: list[httpx.Response] = []
    for name in ("edge", "gw"):
        c: httpx.AsyncClient = apps[name]
        u = _h(apps["user"])
        answers += [
            await c.post("/v1/embeddings", content=b"{nope", headers={**u, "Content-Type": "application/json"}),
            await c.post("/v1/embeddings", json={"input": [], "model": MODEL}, headers=u),
            await c.post("/v1/embeddings", json={"input": "x", "model": "nope"}, headers=u),
            await c.post("/v1/embeddings", json={"input": "x" * 9_000_000, "model": MODEL}, headers=u),
            await c.get("/nope/../../etc/passwd"),
            await c.delete("/v1/embeddings"),
            await c.get("/admin/keys", headers=_h(apps["user"])),
            await c.get("/admin/keys", headers=_h("gz_test_" + "A" * 40)),
            await c.get("/admin/keys/does-not-exist", headers=_h(apps["admin"])),
            await c.post("/admin/keys", json={"name": "x", "scopes": 5}, headers=_h(apps["admin"])),
        ]
    apps["engine"].fail_next = 1  # an engine crash: 500, generic message
    answers.append(await apps["edge"].post("/v1/embeddings", json={"input": "boom", "model": MODEL},
                                           headers=_h(apps["user"])))
    # The gateway's only edge is unreachable: 503 that must not name it.
    answers.append(await apps["gw"].post("/v1/embeddings", json={"input": "x", "model": MODEL},
                                         headers=_h(apps["user"])))
    answers.append(await apps["gw"].get("/inference", params={"d": "x"}, headers=_h(apps["user"])))
    statuses = sorted({r.status_code for r in answers})
    assert {400, 401, 403, 404, 405, 413, 500, 503} <= set(statuses), statuses
    for r in answers:
        text = r.text
        assert r.status_code >= 400
        assert set(json.loads(text)) == {"error"}, text  # OpenAI-shaped, nothing else
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        for needle in ("Traceback", 'File "', ".py", "127.0.0.1", str(PORT), "key_hash", *hashes):
            assert needle not in text, (r.status_code, needle, text)
        assert str(PORT) not in str(r.headers)


async def test_admin_routes_need_admin_scope_on_the_gateway(apps: dict[str, Any]) -> None:
    g: httpx.AsyncClient = apps["gw"]
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/usage")):
        body = {"name": "n"} if method == "POST" else None
        assert (await g.request(method, path, json=body)).status_code == 401
        assert (await g.request(method, path, json=body, headers=_h(apps["user"]))).status_code == 403
        ok = await g.request(method, path, json=body, headers=_h(apps["admin"]))
        assert ok.status_code in (200, 201)
        assert "key_hash" not in ok.text


async def test_cors_is_off_by_default(apps: dict[str, Any]) -> None:
    for name in ("edge", "gw"):
        c: httpx.AsyncClient = apps[name]
        pre = await c.options("/v1/embeddings", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code in (404, 405)
        assert not any(h.lower().startswith("access-control-") for h in pre.headers)
        got = await c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
