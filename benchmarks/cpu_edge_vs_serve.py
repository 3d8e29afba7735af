"""Edge node (fast front and one FastAPI process) vs a plain Ray Serve deployment: same model, same ONNX CPU
engine, same load, one run.

Run inside a loopback-only network namespace (Ray binds to the host address otherwise):

    unshare -n bash -c 'ip link set lo up; .venv/bin/python benchmarks/cpu_edge_vs_serve.py'

Every system batches at most 32 inputs and waits at most 2 ms. The load is closed-loop, single-sentence
POST /v1/embeddings at 32 concurrent clients, every request's text new (``benchmarks/loadgen.py``), and the
edge's response cache is OFF (``--cache on`` to measure it): a benchmark that repeats its inputs measures
the cache, not the serving path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests.support and benchmarks import from the root

from benchmarks.loadgen import LoadSpec, run_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-MiniLM-L6-v2"


def wait_http(url: str, limit_s: float = 180) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} never became ready")


def bench(url: str, concurrency: int, duration: float, metrics_url: str | None = None) -> dict:
    spec = LoadSpec(url=url, concurrency=concurrency, duration_s=duration, warmup_s=3, metrics_url=metrics_url)
    result = asyncio.run(run_load(spec))
    print(f"  {url}: {result.summary()}", flush=True)
    if result.errors or not result.ok:
        raise SystemExit(f"{url} answered with errors; the comparison would be meaningless")
    return json.loads(result.to_json())


def run_edge(args: argparse.Namespace, dataplane: str, port: int) -> dict:
    env = dict(os.environ, GAZSI_BATCHER__MAX_BATCH_SIZE="32", GAZSI_BATCHER__MAX_WAIT_US="2000",
               GAZSI_DATA_DIR=args.data_dir, GAZSI_CACHE__ENABLED="true" if args.cache == "on" else "false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve", "--dataplane", dataplane,
         "--port", str(port), "--admin-port", str(port + 1), "--no-auth", "--backend", "onnx-cpu"],
        env=env, cwd=ROOT,
    )
    ops = f"http://127.0.0.1:{port + 1}" if dataplane != "asgi" else f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{ops}/readyz")
        return bench(f"http://127.0.0.1:{port}", args.concurrency, args.duration, metrics_url=ops)
    finally:
        proc.terminate()
        proc.wait(30)


def run_vanilla_serve(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from benchmarks._ray_home import own_ray_home

    own_ray_home()
    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count(), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8102})
    from benchmarks._vanilla_serve import build

    serve.run(build(args.data_dir), name="vanilla", route_prefix="/")
    try:
        wait_http("http://127.0.0.1:8102/healthz")
        return bench("http://127.0.0.1:8102", args.concurrency, args.duration)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--data-dir", default=str(ROOT / ".gazsi-data"))
    parser.add_argument("--cache", choices=["off", "on"], default="off", help="the edge's response cache")
    parser.add_argument("--systems", default="fast,asgi,serve")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    wanted = args.systems.split(",")
    results: dict[str, dict] = {}
    print(f"response cache {args.cache}; inputs never repeat; {args.concurrency} clients, {args.duration:g} s each",
          flush=True)
    for name, dataplane, port in (("fast", "fast", 8101), ("asgi", "asgi", 8103)):
        if name in wanted:
            print(f"edge node, {dataplane} data plane (gazsi edge serve, ONNX CPU, batch 32 / 2 ms):", flush=True)
            results[f"GAZSI edge ({dataplane})"] = run_edge(args, dataplane, port)
    if "serve" in wanted:
        print("vanilla Ray Serve (FastAPI ingress + @serve.batch 32 / 2 ms, ONNX CPU):", flush=True)
        results["vanilla Ray Serve"] = run_vanilla_serve(args)
    print("\n| system | req/s | p50 ms | p95 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        mb = f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] else "n/a"
        print(f"| {name} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {mb} |")
    base = results.get("vanilla Ray Serve")
    for name, r in results.items():
        if base is not None and r is not base:
            print(f"{name} / vanilla Ray Serve: {r['throughput_rps'] / max(base['throughput_rps'], 1e-9):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"cache": args.cache, "results": results}, indent=2))


if __name__ == "__main__":
    main()
