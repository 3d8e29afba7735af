"""HTTPS join + mTLS heartbeats on loopback, with a real EdgeAgent and the control plane server."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import httpx
import pytest

from control_plane.server import ControlPlaneServer
from control_plane.service import ControlPlane
from control_plane.state import NodeState
from edge_node.agent import EdgeAgent, HttpsLink
from gazsi_cluster.config import Settings
from tests.support.agents import agent_for_link, facts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def agent_for(settings: Settings, url: str, tmp: Path, name: str, port: int, interval: float = 0.2) -> EdgeAgent:
    link = HttpsLink(url, ca_file=tmp / "data" / "ca" / "ca.crt", cert_dir=tmp / name)
    return agent_for_link(settings, link, name, port, token="join-s3cret", interval_s=interval)


async def test_join_heartbeat_table_admin_and_forgery(cp_settings: Settings, tmp_path: Path) -> None:
    server = ControlPlaneServer(ControlPlane(cp_settings))
    await server.start()
    try:
        a = agent_for(cp_settings, server.url, tmp_path, "edge-a", 9001)
        b = agent_for(cp_settings, server.url, tmp_path, "edge-b", 9002)
        await a.beat()
        await b.beat()
        reg = server.cp.registry
        assert reg.nodes["edge-a"].state is NodeState.HEALTHY
        assert reg.nodes["edge-b"].heartbeats == 1
        server.cp.tick(force=True)
        await a.follower.refresh()
        assert set(a.table.by_id) == {"edge-a", "edge-b"}
        assert a.table.by_id["edge-b"].url == "http://127.0.0.1:9002"

        ca = str(tmp_path / "data" / "ca" / "ca.crt")
        load = {"queue_depth": 0}
        # Forged: edge-a's certificate claiming to be edge-b.
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(tmp_path / "edge-a" / "node.crt", tmp_path / "edge-a" / "node.key")
        async with httpx.AsyncClient(verify=ctx) as http:
            r = await http.post(f"{server.url}/v1/heartbeat", json={"node_id": "edge-b", "load": load})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
            r = await http.post(f"{server.url}/v1/heartbeat", json={"node_id": "edge-a", "load": {"p50_ms": -1}})
            assert r.status_code == 400 and r.json()["error"]["param"] == "load"
            r = await http.post(f"{server.url}/v1/heartbeat", content=b"{not json")
            assert r.status_code == 400
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca)) as http:
            # No client certificate: heartbeats refused, joins need the token.
            r = await http.post(f"{server.url}/v1/heartbeat", json={"node_id": "edge-a", "load": load})
            assert r.status_code == 401
            facts_ = facts(port=9100).model_dump()
            r = await http.post(f"{server.url}/v1/join", json={"token": "wrong", "facts": facts_})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = await http.post(f"{server.url}/v1/join", json={"token": "join-s3cret", "facts": {"port": 0}})
            assert r.status_code == 400
            # Duplicate id from another place while edge-a is alive: 409.
            dup = {**facts_, "node_id": "edge-a"}
            r = await http.post(f"{server.url}/v1/join", json={"token": "join-s3cret", "facts": dup})
            assert r.status_code == 409
            # Admin API and /v1/route.
            admin = {"Authorization": "Bearer admin-s3cret"}
            assert (await http.get(f"{server.url}/admin/nodes")).status_code == 401
            r = await http.get(f"{server.url}/admin/nodes", headers=admin)
            assert {n["node_id"] for n in r.json()["data"]} == {"edge-a", "edge-b"}
            r = await http.get(f"{server.url}/v1/route", headers=admin, params={"model": "all-MiniLM-L6-v2"})
            assert r.json()["url"] in {"http://127.0.0.1:9001", "http://127.0.0.1:9002"}
            r = await http.post(f"{server.url}/admin/nodes/edge-b/drain", headers=admin)
            assert r.json()["state"] == "draining"
            r = await http.get(f"{server.url}/v1/route", headers=admin)
            assert r.json()["node_id"] == "edge-a"
            r = await http.delete(f"{server.url}/admin/nodes/edge-b", headers=admin)
            assert r.status_code == 200
            assert (await http.get(f"{server.url}/admin/nodes/edge-b", headers=admin)).status_code == 404
            metrics = (await http.get(f"{server.url}/metrics")).text
            assert 'gazsi_cp_nodes{state="healthy"} 1.0' in metrics
            assert 'gazsi_cp_rejected_total{reason="forged_node_id"} 1.0' in metrics
        # edge-b was removed: its next heartbeat gets 404 unknown_node and it re-joins by itself.
        await b.beat()
        assert reg.nodes["edge-b"].state is NodeState.HEALTHY
        await a.link.aclose()
        await b.link.aclose()
    finally:
        await server.stop()


async def test_vanished_node_leaves_table_within_3s_real_time(tmp_path: Path) -> None:
    from gazsi_cluster.config import load_settings

    settings = load_settings(data_dir=str(tmp_path / "data"),
                             control_plane={"join_token": "join-s3cret", "port": 0})  # default 1 s heartbeats
    server = ControlPlaneServer(ControlPlane(settings))
    await server.start()
    try:
        agent = agent_for(settings, server.url, tmp_path, "edge-x", 9005, interval=1.0)
        await agent.start()
        while "edge-x" not in server.cp.table.by_id:  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.05)
        await agent.stop(say_goodbye=False)  # vanishes: no draining heartbeat
        last = server.cp.registry.nodes["edge-x"].last_heartbeat
        while "edge-x" in server.cp.table.by_id:  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.02)
        gone_after = time.monotonic() - last
        assert gone_after < 3.0, f"left the table {gone_after:.2f}s after its last heartbeat"
    finally:
        await server.stop()
