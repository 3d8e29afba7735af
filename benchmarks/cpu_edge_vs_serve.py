"""Edge node vs a plain Ray Serve deployment, same model, same ONNX CPU engine, same load.

Run inside a loopback-only network namespace (Ray binds to the host address otherwise):

    unshare -n bash -c 'ip link set lo up; .venv/bin/python benchmarks/cpu_edge_vs_serve.py'

Both systems batch at most 32 inputs and wait at most 2 ms. The load is closed-loop,
single-sentence POST /v1/embeddings at 32 concurrent clients (``gazsi bench``'s generator).
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


def bench(url: str, concurrency: int, duration: float) -> dict:
    spec = LoadSpec(url=url, concurrency=concurrency, duration_s=duration, warmup_s=3)
    result = asyncio.run(run_load(spec))
    print(f"  {url}: {result.summary()}", flush=True)
    if result.errors or not result.ok:
        raise SystemExit(f"{url} answered with errors; the comparison would be meaningless")
    return json.loads(result.to_json())


def run_edge(args: argparse.Namespace) -> dict:
    env = dict(os.environ, GAZSI_BATCHER__MAX_BATCH_SIZE="32", GAZSI_BATCHER__MAX_WAIT_US="2000",
               GAZSI_DATA_DIR=args.data_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve",
         "--port", "8101", "--no-auth", "--backend", "onnx-cpu"],
        env=env, cwd=ROOT,
    )
    try:
        wait_http("http://127.0.0.1:8101/readyz")
        return bench("http://127.0.0.1:8101", args.concurrency, args.duration)
    finally:
        proc.terminate()
        proc.wait(30)


def run_vanilla_serve(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

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
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"edge node (gazsi edge serve, ONNX CPU, batch 32 / 2 ms), {args.concurrency} clients:", flush=True)
    edge = run_edge(args)
    print(f"vanilla Ray Serve (FastAPI ingress + @serve.batch 32 / 2 ms, ONNX CPU), {args.concurrency} clients:",
          flush=True)
    vanilla = run_vanilla_serve(args)
    ratio = edge["throughput_rps"] / max(vanilla["throughput_rps"], 1e-9)
    print("\n| system | req/s | p50 ms | p95 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|")
    for name, r in (("GAZSI edge node", edge), ("vanilla Ray Serve", vanilla)):
        mb = f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] else "n/a"
        print(f"| {name} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {mb} |")
    print(f"\nthroughput ratio edge / vanilla Serve: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"edge": edge, "vanilla_serve": vanilla, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
