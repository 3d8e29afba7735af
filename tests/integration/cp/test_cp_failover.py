"""Three fake edges on loopback, one killed under load: no client request may fail."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from control_plane.service import ControlPlane
from gazsi_cluster.config import load_settings
from gazsi_cluster.routing import RoutingClient, RoutingMetrics, make_policy
from tests.support.fake_edge import FakeEdge

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.mark.parametrize("policy", ["p2c", "hash", "wrr"])
async def test_one_edge_killed_under_load_costs_no_request(tmp_path: Path, policy: str) -> None:
    settings = load_settings(data_dir=str(tmp_path), control_plane={"heartbeat_interval_s": 0.2})
    cp = ControlPlane(settings)
    await cp.start()
    edges = [FakeEdge(cp, f"edge-{i}") for i in range(3)]
    for e in edges:
        await e.start()
    cp.tick(force=True)
    client = RoutingClient(lambda: cp.table, make_policy(policy, seed=1), metrics=RoutingMetrics(),
                           timeout_s=2.0, connect_timeout_s=0.5)
    ok = failed = 0
    reasons: list[str] = []  # what each failure was, for the assertion's message
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        nonlocal ok, failed
        n = 0
        while not stop.is_set():
            n += 1
            try:
                resp = await client.request("POST", "/v1/embeddings", json={"input": "x"},
                                            model="all-MiniLM-L6-v2", key=f"w{i}-{n % 7}")
                if resp.status_code == 200:
                    ok += 1
                else:
                    failed += 1
                    reasons.append(f"{resp.status_code} {resp.content[:200]!r}")
            except Exception as exc:
                failed += 1
                reasons.append(repr(exc))

    workers = [asyncio.create_task(worker(i)) for i in range(16)]
    try:
        await asyncio.sleep(0.5)
        victim = edges[1]
        served_before = victim.served
        assert served_before > 0  # it was taking traffic
        await victim.kill()
        killed_at = time.monotonic()
        while "edge-1" in cp.table.by_id:  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.01)
        out_after = time.monotonic() - killed_at
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        for e in edges:
            await e.kill()
        await client.aclose()
        await cp.stop()
    assert failed == 0, reasons
    assert ok > 100
    assert out_after < 3 * 0.2 + 0.5  # dead after 3 missed 0.2 s beats, plus sweep slack
    assert edges[0].served > 0 and edges[2].served > 0
