"""End to end: ``gpu`` data plane vs ``socket`` data plane, same node, same engine, same load.

    python benchmarks/gpu_e2e_bench.py --wrk PATH/TO/wrk [--model-dir DIR] [--duration 5] [--conns 1,64,256]

Each mode runs in its own server process (one process, uvloop, pinned to cores 0-3); wrk runs
pinned to cores 12-15 with a Lua script that makes every request's ``d`` distinct. The response
cache is off so every request reaches the engine. The engine is FakeEngine (hash-based vectors on
the CPU, no model): this measures the data planes, not the model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

_LUA = """counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/inference?d=the%20quick%20brown%20fox%20jumps%20" .. counter)
end
"""


def _runtime(model_dir: str | None) -> Any:
    from edge_node.engines.fake import FakeEngine
    from edge_node.runtime import EdgeRuntime
    from gazsi_cluster.config import load_settings

    engine: dict[str, Any] = {"backend": "fake"}
    if model_dir:
        engine["model_dir"] = model_dir
    settings = load_settings(data_dir=tempfile.mkdtemp(), engine=engine, cache={"enabled": False})
    return EdgeRuntime(settings, engine=FakeEngine())


async def _serve(mode: str, port: int, model_dir: str | None) -> None:
    runtime = _runtime(model_dir)
    await runtime.start(wait=True)
    if mode == "gpu":
        from edge_node.dataplane.gpu.server import GpuDataplane

        plane = GpuDataplane(runtime)
        plane.start()
        await plane.serve("127.0.0.1", port)
        try:
            await asyncio.Event().wait()
        finally:
            await plane.stop()
    else:
        import uvicorn

        from edge_node.dataplane.socket.app import create_app

        server = uvicorn.Server(uvicorn.Config(create_app(runtime, manage_lifespan=False), host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False, loop="none", http="httptools"))
        await server.serve()


def _wait_up(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"server on {port} did not come up")


def _wrk(wrk: str, url: str, conns: int, duration: int, script: str) -> dict[str, float]:
    threads = min(4, conns)
    env = dict(os.environ)
    libdir = Path(wrk).resolve().parent.parent / "lib" / "x86_64-linux-gnu"
    env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
    out = subprocess.run(["taskset", "-c", "12-15", wrk, f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency",
                          "-s", script, url], capture_output=True, text=True, env=env, timeout=duration + 60).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)
    n_total = float(total.group(1)) if total else float("nan")
    return {"rps": float(rps.group(1)) if rps else float("nan"), "p50": ms("50%"), "p99": ms("99%"), "total": n_total,
            "non2xx": float(bad.group(1)) if bad else 0.0, "errors": errs.group(0) if errs else ""}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", choices=["gpu", "socket"])
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--model-dir")
    ap.add_argument("--wrk", default="wrk")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", default="1,64,256")
    args = ap.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve(args.serve, args.port, args.model_dir))
        return
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA)
    print("| mode | connections | responses/s | 200s/s | p50 ms | p99 ms | non-2xx (429/503) |")
    print("|---|---|---|---|---|---|---|")
    for k, mode in enumerate(("socket", "gpu")):
        port = args.port + k
        cmd = ["taskset", "-c", "0-3", sys.executable, __file__, "--serve", mode, "--port", str(port)]
        if args.model_dir:
            cmd += ["--model-dir", args.model_dir]
        proc = subprocess.Popen(cmd)
        try:
            _wait_up(port)
            url = f"http://127.0.0.1:{port}"
            _wrk(args.wrk, url, 16, 2, f.name)  # warm-up
            for conns in (int(c) for c in args.conns.split(",")):
                r = _wrk(args.wrk, url, conns, args.duration, f.name)
                ok = r["rps"] * (1 - r["non2xx"] / r["total"]) if r["total"] else float("nan")
                print(f"| {mode} | {conns} | {r['rps']:,.0f} | {ok:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
                      f"| {r['non2xx']:.0f} |"
                      f"{' ' + str(r['errors']) if r['errors'] else ''}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
