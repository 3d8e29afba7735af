"""Keys, limits, admin API and the response cache through the edge app (FakeEngine, ASGI transport)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_node.engines.fake import FakeEngine
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings
from tests.support.edge import running_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any, FakeEngine]]:
    engine = FakeEngine()
    authorizer = build_authorizer(load_settings(data_dir=str(tmp_path), auth={"key_env": "test"}))
    async with running_node(tmp_path, dataplane="asgi", engine=engine, authorizer=authorizer,
                            auth={"key_env": "test"}) as node:
        async with httpx.AsyncClient(base_url=node.url) as client:
            yield client, authorizer, engine


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def embed(client: httpx.AsyncClient, key: str | None, inp: Any = "hello", **headers: str) -> Any:
    h = {**(auth(key) if key else {}), **headers}
    return client.post("/v1/embeddings", json={"input": inp, "model": MODEL}, headers=h)


async def test_401_403_429_bodies_and_headers(edge: tuple[httpx.AsyncClient, Any, FakeEngine]) -> None:
    client, authorizer, _ = edge
    r = await embed(client, None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "invalid_api_key"
    bogus = "gz_test_" + "A" * 43
    r = await embed(client, bogus)
    assert r.status_code == 401 and bogus not in r.text and "A" * 20 not in r.text
    other = await authorizer.admin.create(name="other-model", scopes=["some-other-model"])
    r = await embed(client, other.key)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert r.json()["error"]["param"] == "model"
    limited = await authorizer.admin.create(name="limited", rpm=2)
    ok = [await embed(client, limited.key, f"x{i}") for i in range(2)]
    assert [x.status_code for x in ok] == [200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "2"
    assert ok[1].headers["x-ratelimit-remaining-requests"] == "0"
    r = await embed(client, limited.key)
    body = r.json()["error"]
    assert r.status_code == 429 and body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.key not in r.text
    revoked = await authorizer.admin.create(name="gone")
    assert (await embed(client, revoked.key)).status_code == 200
    await authorizer.admin.revoke(revoked.record.id)
    r = await embed(client, revoked.key)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


async def test_quota_exhaustion_is_429_insufficient_quota(edge: tuple[httpx.AsyncClient, Any, FakeEngine]) -> None:
    client, authorizer, engine = edge
    key = await authorizer.admin.create(name="quota", monthly_quota=10)
    for _ in range(2):  # 4 tokens each with [CLS]/[SEP]: 8 of 10
        assert (await embed(client, key.key, "hello world", **{"Cache-Control": "no-cache"})).status_code == 200
    calls = len(engine.calls)
    # Charged before the work: 4 more would overdraw the 2 left, so it is refused and never runs.
    r = await embed(client, key.key, "hello world", **{"Cache-Control": "no-cache"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert "monthly token budget of 10 tokens" in r.json()["error"]["message"]
    assert len(engine.calls) == calls


async def test_admin_api_needs_admin_scope_and_never_returns_hashes(
    edge: tuple[httpx.AsyncClient, Any, FakeEngine],
) -> None:
    client, authorizer, _ = edge
    plain = await authorizer.admin.create(name="plain")
    assert (await client.get("/admin/keys", headers=auth(plain.key))).status_code == 403
    assert (await client.get("/admin/keys")).status_code == 401
    adm = await authorizer.admin.create(name="ops", admin=True)
    r = await client.post("/admin/keys", headers=auth(adm.key), json={"name": "made", "rpm": 5})
    assert r.status_code == 201
    made = r.json()
    assert made["key"].startswith("gz_test_") and "key_hash" not in made
    listed = (await client.get("/admin/keys", headers=auth(adm.key))).json()["data"]
    assert {k["name"] for k in listed} == {"plain", "ops", "made"}
    assert all("key_hash" not in k and "key" not in k for k in listed)
    shown = (await client.get(f"/admin/keys/{made['prefix']}", headers=auth(adm.key))).json()
    assert shown["id"] == made["id"] and "key" not in shown
    assert (await embed(client, made["key"])).status_code == 200
    rotated = (await client.post(f"/admin/keys/{made['id']}/rotate", headers=auth(adm.key))).json()
    assert rotated["key"] != made["key"] and rotated["id"] == made["id"]
    old = await embed(client, made["key"])
    assert old.status_code == 401 and old.json()["error"]["code"] == "api_key_revoked"
    assert (await embed(client, rotated["key"])).status_code == 200
    r = await client.post(f"/admin/keys/{rotated['id']}/revoke", headers=auth(adm.key))
    assert r.json()["revoked_at"] is not None
    assert (await embed(client, rotated["key"])).status_code == 401
    assert (await client.get("/admin/keys/nope", headers=auth(adm.key))).status_code == 404
    assert (await client.post("/admin/keys", headers=auth(adm.key), json={"name": ""})).status_code == 400
    usage = (await client.get("/admin/usage", headers=auth(adm.key))).json()["data"]
    by_key = {u["key_id"]: u for u in usage}
    # One request with the old secret, one with the new: rotation keeps the key's usage.
    assert by_key[made["id"]]["requests"] == 2 and by_key[made["id"]]["model"] == MODEL


async def test_response_cache_header_bypass_and_metrics(edge: tuple[httpx.AsyncClient, Any, FakeEngine]) -> None:
    client, authorizer, engine = edge
    key = (await authorizer.admin.create(name="cache")).key
    engine.calls.clear()
    r1 = await embed(client, key, ["alpha", "beta"])
    assert r1.headers["x-gazsi-cache"] == "miss"
    r2 = await embed(client, key, ["beta", "alpha"])
    assert r2.headers["x-gazsi-cache"] == "hit"
    assert r2.json()["data"][0]["embedding"] == r1.json()["data"][1]["embedding"]
    r3 = await embed(client, key, ["alpha", "gamma"])
    assert r3.headers["x-gazsi-cache"] == "partial"
    assert sum(engine.calls) == 3  # alpha, beta, gamma: each computed once
    r4 = await embed(client, key, ["alpha"], **{"Cache-Control": "no-cache"})
    assert r4.headers["x-gazsi-cache"] == "miss" and sum(engine.calls) == 4
    assert r4.json()["usage"]["prompt_tokens"] > 0
    metrics = (await client.get("/metrics")).text
    assert 'gazsi_response_cache_items_total{result="hit"} 3.0' in metrics
    assert 'gazsi_auth_decisions_total{result="ok"}' in metrics
    ready = (await client.get("/readyz")).json()
    assert ready["auth"]["redis"] == "disabled" and ready["cache"]["backend"] == "memory"
