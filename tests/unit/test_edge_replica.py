"""``EdgeReplica.reconfigure`` (the Serve ``user_config`` hook) without Ray: new limits and batching
rules must reach the pipeline and batcher that answer the next requests, not only the settings.

Issue 13 found a replica that applied ``user_config`` to its settings while ``EmbeddingService``
kept the limits object it was built with; this test drives requests through the node before and
after, so a version that keeps the old object fails it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from deployments.edge import EdgeReplica, _sized_to_replica
from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.config import load_settings
from tests.support.edge import wait_node_ready

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MODEL = "all-MiniLM-L6-v2"


async def _embed(c: httpx.AsyncClient, inp: object) -> httpx.Response:
    return await c.post("/v1/embeddings", json={"input": inp, "model": MODEL})


async def _burst(c: httpx.AsyncClient, engine: FakeEngine, n: int = 8) -> list[int]:
    """``n`` single-input requests at once; the batch sizes the engine saw."""
    engine.calls.clear()
    replies = await asyncio.gather(*(_embed(c, f"burst text {i}") for i in range(n)))
    assert [r.status_code for r in replies] == [200] * n
    return list(engine.calls)


async def test_reconfigure_reaches_the_request_path(tmp_path: Path) -> None:
    # delay_s keeps a batch on the engine long enough for the rest of a burst to queue behind it.
    engine = FakeEngine(delay_s=0.05)
    settings = load_settings(
        data_dir=str(tmp_path), engine={"backend": "fake"}, auth={"enabled": False}, cache={"enabled": False},
        edge={"dataplane": "asgi", "port": 0},
        batcher={"max_batch_size": 8, "max_wait_us": 20_000},
        limits={"max_inputs_per_request": 4, "max_input_chars": 1000, "max_body_bytes": 65_536},
    )
    node = EdgeNode(settings, engine=engine)
    replica = EdgeReplica(node)
    async with node:
        await wait_node_ready(node)
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as c:
            # Before: the limits and batching rules the node started with.
            assert (await _embed(c, ["a", "b", "c"])).status_code == 200
            assert (await _embed(c, "x" * 500)).status_code == 200
            big = ["y" * 600, "z" * 600]  # a body over 1 KiB
            assert (await _embed(c, big)).status_code == 200
            assert max(await _burst(c, engine)) > 2

            replica.reconfigure({
                "limits": {"max_inputs_per_request": 2, "max_input_chars": 100, "max_body_bytes": 1024},
                "batcher": {"max_batch_size": 2},
            })

            # After: the very next requests are judged by the new limits ...
            r = await _embed(c, ["a", "b", "c"])
            assert r.status_code == 400, r.text[:300]
            err = r.json()["error"]
            assert err["param"] == "input" and "at most 2 inputs" in err["message"]
            assert (await _embed(c, ["a", "b"])).status_code == 200
            r = await _embed(c, "x" * 500)
            assert r.status_code == 400 and "the limit is 100" in r.json()["error"]["message"]
            r = await _embed(c, big)
            assert r.status_code == 413, r.text[:300]
            # ... and batched by the new rules.
            assert max(await _burst(c, engine)) <= 2
            ready = (await c.get("/readyz")).json()
            assert ready["batcher"]["max_batch_size"] == 2

            # Untouched sections keep their values; an empty user_config changes nothing.
            assert node.settings.batcher.max_wait_us == 20_000
            replica.reconfigure({})
            assert node.settings.limits.max_inputs_per_request == 2


@pytest.mark.parametrize(("dataplane", "workers", "expected"), [
    ("auto", 0, 6), ("fast", 0, 6), ("gpu", 0, 6), ("gpunetio", 0, 6), ("asgi", 0, 0), ("gpu", 3, 3)])
def test_workers_and_gpu_feeds_are_sized_from_the_replicas_cpus(monkeypatch, dataplane: str, workers: int,
                                                                 expected: int) -> None:
    context = SimpleNamespace(get_assigned_resources=lambda: {"CPU": 8.0, "GPU": 1.0})
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(get_runtime_context=lambda: context))
    settings = load_settings(edge={"dataplane": dataplane, "workers": workers})
    assert _sized_to_replica(settings).edge.workers == expected
