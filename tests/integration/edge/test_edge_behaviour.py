"""Overload, disconnects, readiness and engine failure, on loopback with a controllable fake engine."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from edge_node.dataplane.socket.app import create_app
from edge_node.engines.fake import FakeEngine
from edge_node.runtime import EdgeRuntime
from gazsi_cluster.config import load_settings
from tests.support.asgi import serve_on_loopback

from .conftest import wait_ready

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"


def runtime_with(engine: FakeEngine, tmp_path, **batcher) -> EdgeRuntime:
    settings = load_settings(data_dir=tmp_path, engine={"backend": "fake"}, batcher=batcher)
    return EdgeRuntime(settings, engine=engine)


async def test_overload_gets_429_with_retry_after_not_unbounded_latency(tmp_path) -> None:
    engine = FakeEngine(delay_s=0.3)
    runtime = runtime_with(engine, tmp_path, max_batch_size=1, max_wait_us=0, queue_capacity=2)
    async with serve_on_loopback(create_app(runtime)) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        await wait_ready(c)
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
        metrics = (await c.get("/metrics")).text
        assert 'gazsi_requests_total{route="/v1/embeddings",status="429"}' in metrics


async def test_client_disconnect_drops_queued_work(tmp_path) -> None:
    engine = FakeEngine(delay_s=0.4)
    runtime = runtime_with(engine, tmp_path, max_batch_size=1, max_wait_us=0)
    async with serve_on_loopback(create_app(runtime)) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        await wait_ready(c)
        calls_before = len(engine.calls)
        blocker = asyncio.create_task(c.post("/v1/embeddings", json={"input": "first", "model": MODEL}))
        await asyncio.sleep(0.1)
        # This one queues behind the blocker; its client gives up before the engine is free.
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/embeddings", json={"input": "abandoned", "model": MODEL}, timeout=0.1)
        assert (await blocker).status_code == 200
        await asyncio.sleep(0.6)
        assert len(engine.calls) - calls_before == 1, "the abandoned request still ran"
        assert runtime.service.batcher.in_flight_requests == 0


async def test_readyz_is_503_while_the_model_loads(tmp_path) -> None:
    gate = threading.Event()

    class SlowLoad(FakeEngine):
        def load(self) -> None:
            gate.wait(10)
            super().load()

    runtime = runtime_with(SlowLoad(), tmp_path)
    async with serve_on_loopback(create_app(runtime)) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["model_loaded"] is False
        r = await c.post("/v1/embeddings", json={"input": "early", "model": MODEL})
        assert r.status_code == 503 and "retry-after" in r.headers
        gate.set()
        await wait_ready(c)


async def test_engine_failure_mid_batch_fails_that_batch_only(tmp_path) -> None:
    engine = FakeEngine()
    runtime = runtime_with(engine, tmp_path, max_batch_size=8, max_wait_us=50_000)
    async with serve_on_loopback(create_app(runtime)) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        await wait_ready(c)
        engine.fail_next = 1
        replies = await asyncio.gather(
            *[c.post("/v1/embeddings", json={"input": f"t{i}", "model": MODEL}) for i in range(3)]
        )
        assert [r.status_code for r in replies] == [500, 500, 500]
        assert all(r.json()["error"]["code"] == "engine_error" for r in replies)
        ok = await c.post("/v1/embeddings", json={"input": "next", "model": MODEL})
        assert ok.status_code == 200
        assert (await c.get("/readyz")).status_code == 200
