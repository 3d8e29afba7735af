"""An overloaded edge, or one without the model, hands the request to a peer instead of failing."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from edge_node.dataplane.socket.app import create_app
from edge_node.engines.fake import FakeEngine
from edge_node.forwarding import PeerForwarding
from edge_node.runtime import EdgeRuntime
from gazsi_cluster.config import load_settings
from gazsi_cluster.http.server import start_server
from gazsi_cluster.routing import NodeEntry, RoutingClient, RoutingTable, make_policy

from .conftest import wait_ready

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"


def edge(tmp_path, name: str, *, model: str = MODEL, delay: float = 0.0, capacity: int = 128):
    settings = load_settings(
        data_dir=tmp_path / name, engine={"backend": "fake", "model": model},
        batcher={"max_batch_size": 1, "max_wait_us": 0, "queue_capacity": capacity}, cache={"enabled": False},
    )
    engine = FakeEngine(delay_s=delay)
    return EdgeRuntime(settings, engine=engine), engine


async def test_overloaded_or_modelless_edge_forwards_to_a_peer(tmp_path) -> None:
    busy_rt, busy_engine = edge(tmp_path, "busy", delay=0.5, capacity=1)
    other_rt, _ = edge(tmp_path, "other-model", model="some-other-model")
    peer_rt, peer_engine = edge(tmp_path, "peer")
    peer = await start_server(create_app(peer_rt))
    table_ref: dict[str, RoutingTable] = {}
    client = RoutingClient(lambda: table_ref["t"], make_policy("p2c"))
    busy = await start_server(PeerForwarding(create_app(busy_rt), lambda: client, lambda: "busy"))
    other = await start_server(PeerForwarding(create_app(other_rt), lambda: client, lambda: "other"))
    table_ref["t"] = RoutingTable(1, 1, (
        NodeEntry("busy", f"http://127.0.0.1:{busy.port}", models=(MODEL,)),
        NodeEntry("other", f"http://127.0.0.1:{other.port}", models=("some-other-model",)),
        NodeEntry("peer", f"http://127.0.0.1:{peer.port}", models=(MODEL,)),
    ))
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            for srv in (busy, other, peer):
                c.base_url = f"http://127.0.0.1:{srv.port}"
                await wait_ready(c)
            c.base_url = ""
            body = {"model": MODEL, "input": "forward me"}
            busy_url = f"http://127.0.0.1:{busy.port}/v1/embeddings"
            # Three at once at an edge that admits one: the others are forwarded, none fails.
            replies = await asyncio.gather(*[c.post(busy_url, json={**body, "input": f"x{i}"}) for i in range(3)])
            assert [r.status_code for r in replies] == [200, 200, 200]
            assert len(busy_engine.calls) >= 1 and len(peer_engine.calls) >= 1
            # The edge without the model forwards too (it would answer 404 model_not_found).
            r = await c.post(f"http://127.0.0.1:{other.port}/v1/embeddings", json=body)
            assert r.status_code == 200
            # A request already forwarded is never forwarded again (no loops): the 404 stands.
            r = await c.post(f"http://127.0.0.1:{other.port}/v1/embeddings", json=body,
                             headers={"X-Gazsi-Forwarded": "elsewhere"})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"
    finally:
        for srv in (busy, other, peer):
            await srv.stop()
        await client.aclose()
