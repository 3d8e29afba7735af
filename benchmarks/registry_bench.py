"""Registry scale: N simulated nodes heartbeating at 1 Hz into one in-process control plane.

Reports the CPU the control plane used (heartbeat handling incl. validation of the wire dicts,
sweeps, table rebuilds, persistence buffering in embedded mode) as a fraction of one core, and
routing decision latency per policy on the resulting table. Heartbeats are in-process calls,
not HTTPS: this measures the registry, not TLS or HTTP parsing.

    .venv/bin/python benchmarks/registry_bench.py --nodes 10000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time

from control_plane.service import ControlPlane
from gazsi_cluster.config import load_settings
from gazsi_cluster.routing import RouteRequest, make_policy


async def run(nodes: int, seconds: float, tick_ms: int) -> None:
    settings = load_settings(data_dir=tempfile.mkdtemp(prefix="gazsi-bench-"),
                             control_plane={"join_rate_per_s": 1e9, "join_burst": nodes})
    cp = ControlPlane(settings)
    await cp.start()
    regions = [("eu", "eu-a"), ("eu", "eu-b"), ("us", "us-a"), ("ap", "ap-a")]
    ids: list[str] = []
    rng = random.Random(0)
    per_tick = nodes * tick_ms // 1000

    def facts(i: int) -> dict[str, object]:
        region, zone = regions[i % len(regions)]
        return {"node_id": f"sim-{i}", "address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                "port": 8000, "region": region, "zone": zone, "engine_backend": "fake",
                "models": ["all-MiniLM-L6-v2"], "max_batch_size": 8 * (1 + i % 4), "version": "b"}

    # Ramp up as a real fleet would: joins arrive while joined nodes keep heartbeating.
    t_join = time.perf_counter()
    hb = 0
    last = time.perf_counter()
    while len(ids) < nodes:
        for i in range(len(ids), min(nodes, len(ids) + per_tick // 2)):
            ids.append(cp.join(facts(i), None)["node_id"])
            cp.heartbeat(ids[-1], {})
        await asyncio.sleep(tick_ms / 1000)
        now = time.perf_counter()
        # Keep every joined node at ~1 Hz however long the tick took (issuing certs is slow).
        for _ in range(int(len(ids) * (now - last))):
            cp.heartbeat(ids[hb % len(ids)], {})
            hb += 1
        last = now
    join_s = time.perf_counter() - t_join
    cp_cpu = 0.0
    beats = 0
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    next_at = time.perf_counter()
    i = 0
    while time.perf_counter() - start_wall < seconds:
        loads = [{"queue_depth": rng.randrange(0, 20), "in_flight": rng.randrange(0, 8), "p50_ms": 3.0,
                  "p99_ms": 9.0, "mean_batch_size": 4.0} for _ in range(per_tick)]
        t0 = time.thread_time()
        for load in loads:
            cp.heartbeat(ids[i % nodes], load)
            i += 1
        cp_cpu += time.thread_time() - t0
        beats += per_tick
        next_at += tick_ms / 1000
        delay = next_at - time.perf_counter()
        await asyncio.sleep(max(0.0, delay))
    wall = time.perf_counter() - start_wall
    total_cpu = time.process_time() - start_cpu
    # The sweeper task's CPU is in total_cpu; measure a tick directly too.
    t0 = time.thread_time()
    for _ in range(20):
        cp.tick(force=True)
    tick_ms_cost = (time.thread_time() - t0) / 20 * 1000
    counts = cp.registry.counts()
    print(f"nodes={nodes} heartbeats={beats} in {wall:.1f}s ({beats / wall:.0f}/s), healthy={counts['healthy']}, "
          f"table={len(cp.table)} nodes")
    print(f"joins: {nodes} in {join_s:.1f}s (includes issuing a certificate per node)")
    print(f"control plane CPU (heartbeat calls only): {cp_cpu / wall:.2f} core")
    print(f"whole process CPU (heartbeats + sweeper + table rebuilds + load generator): {total_cpu / wall:.2f} core")
    print(f"one sweep + table rebuild: {tick_ms_cost:.2f} ms")
    table = cp.table
    for name in ("p2c", "latency", "affinity", "hash", "wrr"):
        policy = make_policy(name, region="eu", seed=1)
        reqs = [RouteRequest(model="all-MiniLM-L6-v2", key=f"input-{k}", region="eu", zone="eu-b")
                for k in range(50_000)]
        policy.choose(table, reqs[0])  # first call builds rings / sequences once per membership
        samples = []
        for req in reqs:
            t = time.perf_counter_ns()
            policy.choose(table, req)
            samples.append(time.perf_counter_ns() - t)
        samples.sort()
        p50, p99 = samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000
        print(f"routing decision {name:8s}: p50 {p50:6.2f} us  p99 {p99:6.2f} us  mean {statistics.fmean(samples) / 1000:6.2f} us")
    await cp.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tick-ms", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(run(args.nodes, args.seconds, args.tick_ms))


if __name__ == "__main__":
    main()
