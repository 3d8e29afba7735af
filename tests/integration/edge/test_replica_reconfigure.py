"""``EdgeReplica.reconfigure`` on the fast front (what a Serve Edge replica runs by default): new limits
reach every worker process's pipeline and new batching rules the node's slot batcher.

The in-process twin is ``tests/unit/test_edge_replica.py``; here the requests go over HTTP to the
worker processes, which get the new limits through their control pipe.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from deployments.edge import EdgeReplica
from edge_node.engines.fake import FakeEngine
from tests.support.edge import running_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MODEL = "all-MiniLM-L6-v2"
WORKERS = 2


async def _fresh(url: str, inp: object) -> int:
    # A new connection each time, so SO_REUSEPORT spreads the requests over every worker.
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return (await c.post("/v1/embeddings", json={"input": inp, "model": MODEL})).status_code


async def _burst(url: str, engine: FakeEngine, n: int = 8) -> list[int]:
    """``n`` single-input requests at once; the batch sizes the engine saw."""
    engine.calls.clear()
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        replies = await asyncio.gather(*(c.post("/v1/embeddings", json={"input": f"burst {i}", "model": MODEL})
                                         for i in range(n)))
    assert [r.status_code for r in replies] == [200] * n
    return list(engine.calls)


async def test_reconfigure_reaches_every_fast_worker(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.05)
    async with running_node(tmp_path, dataplane="fast", workers=WORKERS, engine=engine, cache={"enabled": False},
                            batcher={"max_batch_size": 8, "max_wait_us": 20_000},
                            limits={"max_inputs_per_request": 4}) as node:
        replica = EdgeReplica(node)
        assert [await _fresh(node.url, ["a", "b", "c"]) for _ in range(6)] == [200] * 6
        assert max(await _burst(node.url, engine)) > 2

        replica.reconfigure({"limits": {"max_inputs_per_request": 2}, "batcher": {"max_batch_size": 2}})

        # The workers apply what the node sent through their pipes within moments; then every one refuses.
        deadline = time.monotonic() + 5
        while await _fresh(node.url, ["a", "b", "c"]) != 400:
            assert time.monotonic() < deadline, "the new limit never reached a worker"
        assert [await _fresh(node.url, ["a", "b", "c"]) for _ in range(12)] == [400] * 12
        assert await _fresh(node.url, ["a", "b"]) == 200

        assert max(await _burst(node.url, engine)) <= 2
        async with httpx.AsyncClient(timeout=10) as c:
            ready = (await c.get(f"http://127.0.0.1:{node.admin_port}/readyz")).json()
        assert ready["batcher"]["max_batch_size"] == 2
