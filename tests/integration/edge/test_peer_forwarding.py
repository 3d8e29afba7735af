"""An overloaded edge, or one without the model, hands the request to a peer instead of failing (every transport)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import httpx
import pytest

from edge_node.engines.fake import FakeEngine
from gazsi_cluster.routing import NodeEntry, RoutingTable
from tests.support.agents import StaticLink
from tests.support.edge import TRANSPORTS, running_node

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("dataplane", TRANSPORTS)]
MODEL = "all-MiniLM-L6-v2"


async def test_overloaded_or_modelless_edge_forwards_to_a_peer(tmp_path, dataplane) -> None:
    tables: dict[str, RoutingTable] = {}
    busy_engine, peer_engine = FakeEngine(delay_s=0.5), FakeEngine()
    one_at_a_time = {"max_batch_size": 1, "max_wait_us": 0, "queue_capacity": 1}
    async with AsyncExitStack() as stack:
        busy = await stack.enter_async_context(running_node(
            tmp_path / "busy", dataplane=dataplane, engine=busy_engine, workers=1, batcher=one_at_a_time,
            cache={"enabled": False}, link=StaticLink("busy", tables), edge={"ring_slots_per_worker": 1}))
        other = await stack.enter_async_context(running_node(
            tmp_path / "other", dataplane=dataplane, engine=FakeEngine(), workers=1, cache={"enabled": False},
            engine_model="some-other-model", link=StaticLink("other", tables)))
        peer = await stack.enter_async_context(running_node(
            tmp_path / "peer", dataplane=dataplane, engine=peer_engine, workers=1, cache={"enabled": False},
            link=StaticLink("peer", tables)))
        tables["t"] = RoutingTable(1, 1, (
            NodeEntry("busy", busy.url, models=(MODEL,)),
            NodeEntry("other", other.url, models=("some-other-model",)),
            NodeEntry("peer", peer.url, models=(MODEL,)),
        ))
        for _ in range(100):  # every node's agent has the table...
            if all(n.routing_table_or_empty().version == 1 for n in (busy, other, peer)):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # ...and the fast front pushed it on to its workers (every 0.25 s)
        async with httpx.AsyncClient(timeout=30) as c:
            body = {"model": MODEL, "input": "forward me"}
            # Three at once at an edge that admits one: the others are forwarded, none fails.
            replies = await asyncio.gather(*[c.post(f"{busy.url}/v1/embeddings", json={**body, "input": f"x{i}"})
                                             for i in range(3)])
            assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
            assert len(busy_engine.calls) >= 1 and len(peer_engine.calls) >= 1
            # The edge without the model forwards too (it would answer 404 model_not_found).
            r = await c.post(f"{other.url}/v1/embeddings", json=body)
            assert r.status_code == 200
            # A request already forwarded is never forwarded again (no loops): the 404 stands.
            r = await c.post(f"{other.url}/v1/embeddings", json=body, headers={"X-Gazsi-Forwarded": "elsewhere"})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"
