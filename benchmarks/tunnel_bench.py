"""Reverse tunnel (issue 17): one edge reached directly vs through its tunnel, same load; drop and reconnect times.

Everything on loopback: a control plane and gateways in this process, the edge as ``gazsi edge serve``
(ONNX CPU, fast front with one worker) in its own process, the load generator
(:func:`benchmarks.loadgen.run_load`, closed loop) in another so it does not share the gateways' loop.

* throughput/latency: gateway A routes to the edge's address (``http://127.0.0.1:port``), gateway B to
  ``tunnel://<id>`` (HTTP/2 down the tunnel, then the edge's own listener on loopback); the same edge,
  the same load, runs alternated; plus the client straight to the edge as the floor.
* drop: ``kill -9`` of a tunnelled edge (the kernel closes its socket) and ``SIGSTOP`` (a silent peer:
  only PINGs notice), time until the node is out of the gateway's table.
* reconnect: the gateway (and its tunnel listener) stopped and started again on the same port, time until
  the edge's tunnel is back.

    .venv/bin/python benchmarks/tunnel_bench.py --seconds 10 --concurrency 16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests.support and benchmarks import from the root

from benchmarks.loadgen import LoadSpec, run_load  # noqa: E402
from gazsi_cluster.routing import NodeEntry, RoutingTable  # noqa: E402
from tests.support.edge import EdgeProcess  # noqa: E402
from tests.support.tunnel import TunnelCluster, start_gateway, stop_gateway, tunnel_cluster, until  # noqa: E402

MODEL = "all-MiniLM-L6-v2"


def _load(url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    r = asyncio.run(run_load(LoadSpec(url=url, concurrency=concurrency, duration_s=seconds, warmup_s=1.0)))
    return {"rps": round(r.throughput_rps, 1), "p50_ms": round(r.p50_ms, 2), "p99_ms": round(r.p99_ms, 2),
            "ok": r.ok, "errors": r.errors}


async def _routed(cluster: TunnelCluster, limit_s: float = 60) -> str:
    async def probe() -> str | None:
        return next((n.node_id for n in cluster.gateway.table().nodes if n.url.startswith("tunnel://")), None)

    return await until(probe, limit_s, "the edge routable through its tunnel", step_s=0.005)


async def throughput(tmp: Path, seconds: float, concurrency: int, rounds: int) -> dict[str, Any]:
    async with tunnel_cluster(tmp) as cluster:
        # No response cache: every request is inferred (the load generator repeats its inputs run to run).
        edge = await asyncio.to_thread(EdgeProcess, tmp / "edge", "--dataplane", "fast", "--workers", "1",
                                       "--no-auth", *cluster.edge_args(), env={"GAZSI_CACHE__ENABLED": "false"})
        try:
            node_id = await _routed(cluster)
            direct_table = RoutingTable(1, 1, (NodeEntry(node_id, edge.url, models=(MODEL,)),))
            gw, hub, listener, direct_gw = await start_gateway(cluster.settings, lambda: direct_table)
            paths = {"client -> edge": edge.url, "gateway -> edge (direct)": direct_gw,
                     "gateway -> tunnel -> edge": cluster.gateway_url}
            pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            loop = asyncio.get_running_loop()
            out: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
            try:
                await loop.run_in_executor(pool, _load, edge.url, 3.0, concurrency)  # warm the engine
                names = list(paths)
                for i in range(rounds):  # the order rotates, so no path always runs first or last
                    for name in names[i % len(names):] + names[:i % len(names)]:
                        url = paths[name]
                        out[name].append(await loop.run_in_executor(pool, _load, url, seconds, concurrency))
            finally:
                pool.shutdown()
                await stop_gateway(gw, hub, listener)
            return out
        finally:
            await asyncio.to_thread(edge.stop)


async def drops(tmp: Path, repeats: int) -> dict[str, list[float]]:
    """ms until the node is out of the gateway's table, and until its tunnel is closed."""
    times: dict[str, list[float]] = {"kill -9": [], "kill -9 tunnel closed": [], "SIGSTOP": [],
                                     "SIGSTOP tunnel closed": []}
    async with tunnel_cluster(tmp) as cluster:
        for i in range(repeats):
            for how, sig in (("kill -9", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
                edge = await asyncio.to_thread(EdgeProcess, tmp / f"edge-{how[:4]}-{i}", "--dataplane", "fast",
                                               "--workers", "1", "--no-auth", "--backend", "fake",
                                               *cluster.edge_args())
                node_id = await _routed(cluster)
                dropped = time.monotonic()
                os.kill(edge.proc.pid, sig)

                async def gone(n: str = node_id) -> bool | None:
                    return True if n not in cluster.gateway.table().by_id else None

                await until(gone, 15, "the dropped node out of the table", step_s=0.002)
                times[how].append(round((time.monotonic() - dropped) * 1000, 1))

                async def closed(n: str = node_id) -> bool | None:
                    return True if n not in cluster.hub.tunnels else None

                await until(closed, 15, "the dropped node's tunnel closed", step_s=0.002)
                times[f"{how} tunnel closed"].append(round((cluster.hub.closed_at[node_id] - dropped) * 1000, 1))
                edge.proc.kill()
                edge.proc.wait(10)
    return times


async def reconnects(tmp: Path, repeats: int) -> list[float]:
    times = []
    async with tunnel_cluster(tmp) as cluster:
        edge = await asyncio.to_thread(EdgeProcess, tmp / "edge", "--dataplane", "fast", "--workers", "1",
                                       "--no-auth", "--backend", "fake", *cluster.edge_args())
        try:
            node_id = await _routed(cluster)
            for _ in range(repeats):
                listening = await cluster.restart_gateway()

                async def back() -> bool | None:
                    return True if node_id in cluster.hub.tunnels else None

                await until(back, 20, "the tunnel back", step_s=0.002)
                times.append(round((time.monotonic() - listening) * 1000, 1))
                await asyncio.sleep(0.5)
        finally:
            await asyncio.to_thread(edge.stop)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("GAZSI_ENGINE__ONNX_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="gazsi-tunnel-bench-"))
    result: dict[str, Any] = {"cpus": os.cpu_count(), "concurrency": args.concurrency, "seconds": args.seconds}
    result["load"] = asyncio.run(throughput(tmp / "load", args.seconds, args.concurrency, args.rounds))
    for name, runs in result["load"].items():
        print(f"{name:28s} " + " | ".join(f"{r['rps']:7.1f} req/s p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:6.2f} ms"
                                         f" errors {r['errors'] or 0}" for r in runs), flush=True)
    result["drop_ms"] = asyncio.run(drops(tmp / "drop", args.repeats))
    for how, ms in result["drop_ms"].items():
        what = "tunnel closed" if how.endswith("tunnel closed") else "out of the gateway's table"
        print(f"drop ({how}) -> {what}: median {statistics.median(ms):.1f} ms, all {ms}", flush=True)
    result["reconnect_ms"] = asyncio.run(reconnects(tmp / "reconnect", args.repeats))
    ms = result["reconnect_ms"]
    print(f"gateway restart -> tunnel back: median {statistics.median(ms):.1f} ms, all {ms}", flush=True)
    print("JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
