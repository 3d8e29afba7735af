"""Overload, disconnects, readiness and engine failure on every CPU transport, with a controllable fake engine."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from edge_node.engines.fake import FakeEngine
from tests.support.edge import TRANSPORTS, running_node

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("dataplane", TRANSPORTS)]
MODEL = "all-MiniLM-L6-v2"


async def test_overload_gets_429_with_retry_after_not_unbounded_latency(tmp_path, dataplane) -> None:
    engine = FakeEngine(delay_s=0.3)
    batcher = {"max_batch_size": 1, "max_wait_us": 0, "queue_capacity": 2}
    # One worker with two ring slots, so the fast front's own admission bound is reached too.
    edge = {"ring_slots_per_worker": 2}
    async with running_node(tmp_path, dataplane=dataplane, engine=engine, workers=1, batcher=batcher, edge=edge) as node, \
            httpx.AsyncClient(base_url=node.url, timeout=30) as c:
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = await asyncio.gather(
            *[c.post("/v1/embeddings", json={"input": f"t{i}", "model": MODEL}) for i in range(8)]
        )
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 4, statuses
        refused = next(r for r in replies if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"
        # Refusals came at once: the whole burst took about two engine calls, not eight.
        assert loop.time() - started < 8 * 0.3
        metrics = (await c.get(f"http://127.0.0.1:{node.admin_port}/metrics")).text
        assert 'gazsi_requests_total{route="/v1/embeddings",status="429"}' in metrics


async def test_client_disconnect_drops_queued_work(tmp_path, dataplane) -> None:
    engine = FakeEngine(delay_s=0.4)
    batcher = {"max_batch_size": 1, "max_wait_us": 0}
    async with running_node(tmp_path, dataplane=dataplane, engine=engine, workers=1, batcher=batcher) as node, \
            httpx.AsyncClient(base_url=node.url, timeout=30) as c:
        calls_before = len(engine.calls)
        blocker = asyncio.create_task(c.post("/v1/embeddings", json={"input": "first", "model": MODEL}))
        await asyncio.sleep(0.1)
        # This one queues behind the blocker; its client gives up before the engine is free.
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/embeddings", json={"input": "abandoned", "model": MODEL}, timeout=0.1)
        assert (await blocker).status_code == 200
        await asyncio.sleep(0.6)
        assert len(engine.calls) - calls_before == 1, "the abandoned request still ran"
        assert node.load().in_flight == 0


async def test_readyz_is_503_while_the_model_loads(tmp_path, dataplane) -> None:
    gate = threading.Event()

    class SlowLoad(FakeEngine):
        def load(self) -> None:
            gate.wait(10)
            super().load()

    async with running_node(tmp_path, dataplane=dataplane, engine=SlowLoad(), wait=False) as node, \
            httpx.AsyncClient(base_url=node.url, timeout=30) as c:
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get(f"http://127.0.0.1:{node.admin_port}/readyz")
        assert r.status_code == 503 and r.json()["state"] == "loading"
        r = await c.post("/v1/embeddings", json={"input": "early", "model": MODEL})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["message"] == "the model is still loading"
        gate.set()
        for _ in range(200):
            if (await c.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await c.post("/v1/embeddings", json={"input": "late", "model": MODEL})).status_code == 200


async def test_engine_failure_mid_batch_fails_that_batch_only(tmp_path, dataplane) -> None:
    engine = FakeEngine()
    batcher = {"max_batch_size": 8, "max_wait_us": 50_000}
    async with running_node(tmp_path, dataplane=dataplane, engine=engine, workers=1, batcher=batcher) as node, \
            httpx.AsyncClient(base_url=node.url, timeout=30) as c:
        # Warm: with nothing running, the fast front's batcher dispatches at once (no company to wait for).
        assert (await c.post("/v1/embeddings", json={"input": "warm", "model": MODEL})).status_code == 200
        engine.fail_next = 1
        replies = await asyncio.gather(
            *[c.post("/v1/embeddings", json={"input": f"t{i}", "model": MODEL}) for i in range(3)]
        )
        codes = [r.status_code for r in replies]
        assert 500 in codes and set(codes) <= {200, 500}, codes
        assert all(r.json()["error"]["code"] == "engine_error" for r in replies if r.status_code == 500)
        ok = await c.post("/v1/embeddings", json={"input": "next", "model": MODEL})
        assert ok.status_code == 200
        assert (await c.get("/readyz")).status_code == 200
