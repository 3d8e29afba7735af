"""The request paths of a deployed cluster side by side, same machine, same run, same load.

    unshare -n bash -c 'ip link set lo up; .venv/bin/python benchmarks/serve_paths_bench.py'

1. `gazsi up` (the CPU Serve profile: Gateway + Edge, batch 32 / 2 ms, ONNX CPU, bearer key on);
   load via the gateway behind Ray's proxy, via the gateway's direct listener, and straight at the
   edge that `/v1/route` names.
2. `gazsi down`, then a vanilla Serve app (FastAPI ingress + @serve.batch 32 / 2 ms, same engine).
Closed loop, single-sentence POST /v1/embeddings, 32 clients (`gazsi bench`'s generator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.loadgen import LoadSpec, run_load
from gazsi_cli.ports import free_port

GAZSI = str(Path(sys.executable).parent / "gazsi")



def bench(name: str, url: str, key: str | None, args: argparse.Namespace) -> dict:
    spec = LoadSpec(url=url, concurrency=args.concurrency, duration_s=args.duration, warmup_s=3, api_key=key)
    result = asyncio.run(run_load(spec))
    print(f"  {name}: {result.summary()}", flush=True)
    return {"name": name, **json.loads(result.to_json())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="gazsi-bench-"))
    proxy, gw = free_port(), free_port()
    env = dict(os.environ, GAZSI_GATEWAY__PORT=str(gw))
    up = subprocess.run([GAZSI, "--log-level", "warning", "up", "--data-dir", str(data), "--port", str(proxy)],
                        capture_output=True, text=True, env=env, timeout=900)
    if up.returncode != 0:
        raise SystemExit(up.stdout + up.stderr)
    key = re.search(r"admin key \(shown once, stored hashed\): (gz_[A-Za-z0-9_-]+)", up.stdout).group(1)  # type: ignore[union-attr]
    rows = []
    try:
        route = httpx.get(f"http://127.0.0.1:{gw}/v1/route", headers={"Authorization": f"Bearer {key}"})
        if route.status_code != 200:
            raise SystemExit(f"/v1/route answered {route.status_code}: {route.text}")
        edge = route.json()["url"]
        rows.append(bench("gateway via Ray Serve proxy", f"http://127.0.0.1:{proxy}", key, args))
        rows.append(bench("gateway direct listener", f"http://127.0.0.1:{gw}", key, args))
        rows.append(bench("edge directly (CDN path)", edge, key, args))
    finally:
        subprocess.run([GAZSI, "down", "--data-dir", str(data)], capture_output=True, env=env, timeout=300)
    time.sleep(2)
    import ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._ray_home import own_ray_home
    from benchmarks._vanilla_serve import build

    own_ray_home()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(str(data)), name="vanilla", route_prefix="/")
    try:
        rows.append(bench("vanilla Ray Serve (@serve.batch)", f"http://127.0.0.1:{port}", None, args))
    finally:
        serve.shutdown()
        ray.shutdown()
    print("\n| path | req/s | p50 ms | p99 ms | mean batch | errors |\n|---|---|---|---|---|---|")
    for r in rows:
        mb = f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] else "n/a"
        errs = sum(r["errors"].values())
        print(f"| {r['name']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {mb} | {errs} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
