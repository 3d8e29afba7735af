"""The gateway's direct listener alone: FastAPI on uvicorn vs ``DirectGateway`` on ``HttpListener``.

One edge (``gazsi edge serve``, fast front; the fake engine by default so the edge is not the limit),
one gateway process per variant with a fixed routing table to it, the same wrk load (single-input
``POST /v1/embeddings``, inputs that do not repeat within 64 bodies). Reports 2xx answers per second and
the gateway process's CPU per request. Variants (``--variants``): ``fastapi`` (the app on uvicorn),
``direct`` (the direct listener), ``direct-aiohttp`` (the same with the aiohttp sender the routing
client used before issue 14's pools), ``direct-before`` (the direct listener of another tree,
``--before-tree``, e.g. ``git archive`` of an older commit, run with that tree's own copy of this script):

    python3 benchmarks/gateway_direct_bench.py --wrk .carry/perf/wrk --out /tmp/gwbench \\
        --gateway-cores 0 --edge-cores 1 --wrk-cores 1 --before-tree /tmp/gw-before \\
        --variants fastapi,direct-before,direct-aiohttp,direct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.h100_bench import CORES, Wrk  # noqa: E402

MODEL = "all-MiniLM-L6-v2"


def serve_gateway(variant: str, edge_url: str, port: int, model: str = MODEL, sender: str = "default") -> None:
    """The gateway process: one variant of the direct listener in front of ``edge_url`` serving ``model``.

    ``sender="aiohttp"``: the routing client sends with aiohttp, as before issue 14's pools."""
    from gazsi_cluster.auth import AllowAll
    from gazsi_cluster.config import load_settings
    from gazsi_cluster.gateway import DirectGateway, Gateway, create_gateway_app
    from gazsi_cluster.http.hardening import listener_options
    from gazsi_cluster.http.listener import HttpListener, bind_socket
    from gazsi_cluster.http.server import start_server
    from gazsi_cluster.routing import NodeEntry, RoutingTable

    async def main() -> None:
        settings = load_settings(auth={"enabled": False})
        table = RoutingTable(1, 1, (NodeEntry("e1", edge_url, models=(model,)),))
        gateway = Gateway(settings, authorizer=AllowAll(), table=lambda: table)
        if sender == "aiohttp":
            from gazsi_cluster.routing._transport import AiohttpSender

            cp = settings.control_plane
            gateway.routing.sender = AiohttpSender(timeout_s=cp.request_timeout_s,
                                                   connect_timeout_s=cp.connect_timeout_s)
        if variant == "fastapi":
            await start_server(create_gateway_app(gateway), "127.0.0.1", port, **listener_options(settings.limits))
        else:
            listener = HttpListener(DirectGateway(gateway, create_gateway_app(gateway)).handle, settings.limits)
            await listener.start(bind_socket("127.0.0.1", port))
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(main())


def wait_ok(url: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready")


def start_edge(tree: Path, env: dict[str, str], cores: str, backend: str, log: Path) -> subprocess.Popen[bytes]:
    """``gazsi edge serve`` from ``tree`` on :8400 (operator app :8401), one worker, auth off."""
    return subprocess.Popen(
        ["taskset", "-c", cores, sys.executable, "-m", "gazsi_cli.main", "edge", "serve", "--port", "8400",
         "--admin-port", "8401", "--workers", "1", "--backend", backend, "--no-auth"],
        env=env, cwd=tree, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def start_gateway(tree: Path, env: dict[str, str], cores: str, serve: str, port: int, log: Path,
                  extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    """This script of ``tree`` serving one gateway listener (``serve``) on ``port`` in front of the edge."""
    return subprocess.Popen(
        ["taskset", "-c", cores, sys.executable, str(tree / "benchmarks/gateway_direct_bench.py"),
         "--wrk", "-", "--out", "-", "--serve", serve, "--edge-url", "http://127.0.0.1:8400",
         "--port", str(port), *(extra or [])],
        env={**env, "PYTHONPATH": str(tree)}, cwd=tree, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def stop(proc: subprocess.Popen[bytes], wait_s: float) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(wait_s)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wrk", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", default="fake")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--gateway-cores", default="0")
    ap.add_argument("--edge-cores", default="1")
    ap.add_argument("--wrk-cores", default="1")
    ap.add_argument("--variants", default="fastapi,direct", help="comma-separated: fastapi, direct, "
                    "direct-aiohttp, direct-before (needs --before-tree)")
    ap.add_argument("--before-tree", type=Path, help="a tree (with this script) whose direct listener is the before")
    ap.add_argument("--serve", choices=["fastapi", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--sender", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--edge-url", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=8410, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_gateway(args.serve, args.edge_url, args.port, sender=args.sender)
        return 0
    CORES["wrk"] = args.wrk_cores
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GAZSI_AUTH__ENABLED": "false", "GAZSI_CACHE__ENABLED": "false",
           "GAZSI_LOG_LEVEL": "warning", "GAZSI_DATA_DIR": str(out / "data"),
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    edge = start_edge(ROOT, env, args.edge_cores, args.backend, out / "edge.log")
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv,
                               "backend": args.backend, "conns": args.conns, "variants": {}}
    variants = args.variants.split(",")
    if "direct-before" in variants and args.before_tree is None:
        ap.error("direct-before needs --before-tree")
    wrk = Wrk(args.wrk, out)
    try:
        wait_ok("http://127.0.0.1:8401/readyz")
        for variant in variants:
            tree, serve, extra = ROOT, variant, []
            if variant == "direct-before":
                tree, serve = args.before_tree.resolve(), "direct"
            elif variant == "direct-aiohttp":
                serve, extra = "direct", ["--sender", "aiohttp"]
            gw = start_gateway(tree, env, args.gateway_cores, serve, args.port, out / f"gateway_{variant}.log", extra)
            try:
                wait_ok(f"http://127.0.0.1:{args.port}/healthz")
                url = f"http://127.0.0.1:{args.port}"
                warm = wrk.run(url, "single", args.conns, 2, statuses=True)  # warm-up
                print(f"{variant:14s}: warm-up answers {warm.get('statuses')}", flush=True)
                c0 = cpu_s(gw.pid)
                r = wrk.run(url, "single", args.conns, args.duration, statuses=True)
                c1 = cpu_s(gw.pid)
                ok = r["requests"] - r["errors"]
                r["ok_rps"] = ok / (r["duration_us"] / 1e6)
                r["gateway_cpu_ms_per_req"] = (c1 - c0) * 1e3 / max(1, ok)
                r["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
                results["variants"][variant] = r
                print(f"{variant:14s}: {r['ok_rps']:9,.0f} 2xx/s  p50 {r['p50'] / 1e3:6.2f} ms  errors {r['errors']}  "
                      f"gateway CPU {r['gateway_cpu_ms_per_req']:.3f} ms/request {r.get('statuses')}  "
                      f"load {' '.join(r['loadavg'])}", flush=True)
            finally:
                stop(gw, 20)
    finally:
        stop(edge, 30)
        (out / "gateway_direct_bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
