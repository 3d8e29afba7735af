"""Failover: three loopback edges under load, one killed; failed requests and time out of the table.

Edges are small aiohttp servers (``tests.support.fake_edge.FakeEdge``, 2 ms per request) that
heartbeat into an in-process control plane at the default 1 s interval; clients route with
``RoutingClient`` reading the control plane's published table.

    .venv/bin/python benchmarks/failover_bench.py --seconds 8 --kill-at 3 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from control_plane.service import ControlPlane
from gazsi_cluster.config import load_settings
from gazsi_cluster.routing import RoutingClient, RoutingMetrics, make_policy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests.support and benchmarks import from the root

from tests.support.fake_edge import FakeEdge  # noqa: E402


async def run(seconds: float, kill_at: float, concurrency: int, policy: str) -> None:
    cp = ControlPlane(load_settings(data_dir=tempfile.mkdtemp(prefix="gazsi-fo-")))
    await cp.start()
    edges = [FakeEdge(cp, f"edge-{i}") for i in range(3)]
    for e in edges:
        await e.start()
    cp.tick(force=True)
    metrics = RoutingMetrics()
    client = RoutingClient(lambda: cp.table, make_policy(policy, seed=1), metrics=metrics, timeout_s=2.0)
    ok = failed = 0
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        nonlocal ok, failed
        n = 0
        while not stop.is_set():
            n += 1
            try:
                r = await client.request("POST", "/v1/embeddings", json={"input": "x"}, model="all-MiniLM-L6-v2",
                                         key=f"{i}-{n}")
                ok, failed = (ok + 1, failed) if r.status_code == 200 else (ok, failed + 1)
            except Exception:
                failed += 1

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(kill_at)
    victim = edges[1]
    last_beat = cp.registry.nodes[victim.name].last_heartbeat
    await victim.kill()
    killed = time.monotonic()
    while victim.name in cp.table.by_id:  # noqa: ASYNC110 - polling a plain attribute
        await asyncio.sleep(0.005)
    out = time.monotonic()
    await asyncio.sleep(max(0.0, seconds - (out - killed) - kill_at))
    stop.set()
    await asyncio.gather(*tasks)
    for e in edges:
        await e.kill()
    await client.aclose()
    await cp.stop()
    print(f"policy={policy} concurrency={concurrency} requests ok={ok} failed={failed}")
    print(f"retries={metrics.retries._value.get():.0f} "
          f"attempt failures={sum(s.value for m in metrics.failures.collect() for s in m.samples if s.name.endswith('_total')):.0f}")
    print(f"out of the table {out - killed:.2f}s after the kill, {out - last_beat:.2f}s after its last heartbeat "
          f"(heartbeat interval {cp.config.heartbeat_interval_s}s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--kill-at", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--policy", default="p2c")
    args = ap.parse_args()
    asyncio.run(run(args.seconds, args.kill_at, args.concurrency, args.policy))


if __name__ == "__main__":
    main()
