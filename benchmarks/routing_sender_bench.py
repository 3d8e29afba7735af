"""The routing client's senders alone: client CPU per request against one fast-front edge.

One edge (``gazsi edge serve``, fake engine, 1 worker) on ``--edge-cores``; this process on
``--client-cores`` sends single-input ``POST /v1/embeddings`` from 64 concurrent loops through each sender
in turn (twice): aiohttp as the routing client built it before issue 14, aiohttp tuned (per-host limit,
no cookie jar, no automatic headers, DNS cache), and the pooled sender. Reports req/s and the process's
CPU per request (``time.process_time``):

    python3 benchmarks/routing_sender_bench.py --edge-cores 1 --client-cores 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from benchmarks.gateway_direct_bench import MODEL, wait_ok  # noqa: E402
from gazsi_cluster.routing._pool import PooledSender  # noqa: E402
from gazsi_cluster.routing._transport import AiohttpSender  # noqa: E402

BODIES = [orjson.dumps({"input": f"hello world {i}", "model": MODEL}) for i in range(64)]
HEADERS = {"content-type": "application/json"}


class TunedAiohttp(AiohttpSender):
    """aiohttp as well tuned as it gets for this use."""

    def _session_now(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=64, ssl=self._ssl, use_dns_cache=True,
                                               ttl_dns_cache=None),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s, sock_connect=self._connect_timeout_s),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session


async def measure(sender: Any, url: str, conc: int, secs: float) -> tuple[float, float, int]:
    count, bad = 0, 0

    async def loop(i: int, stop: float) -> None:
        nonlocal count, bad
        while time.monotonic() < stop:
            r = await sender.send("POST", url, content=BODIES[(count + i) % 64], headers=HEADERS)
            count += 1
            bad += r.status_code != 200

    await asyncio.gather(*(loop(i, time.monotonic() + 1) for i in range(2)))  # connections up, code warm
    count = 0
    c0, t0 = time.process_time(), time.perf_counter()
    stop = time.monotonic() + secs
    await asyncio.gather(*(loop(i, stop) for i in range(conc)))
    c1, t1 = time.process_time(), time.perf_counter()
    await sender.aclose()
    return count / (t1 - t0), (c1 - c0) * 1e3 / max(1, count), bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edge-cores", default="1")
    ap.add_argument("--client-cores", default="0")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/routing_sender_bench"))
    args = ap.parse_args()
    import uvloop

    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GAZSI_AUTH__ENABLED": "false", "GAZSI_CACHE__ENABLED": "false",
           "GAZSI_LOG_LEVEL": "warning", "GAZSI_DATA_DIR": str(args.out / "data"),
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    edge = subprocess.Popen(
        ["taskset", "-c", args.edge_cores, sys.executable, "-m", "gazsi_cli.main", "edge", "serve", "--port", "8400",
         "--admin-port", "8401", "--workers", "1", "--backend", "fake", "--no-auth"],
        env=env, cwd=ROOT, stdout=(args.out / "edge.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    os.sched_setaffinity(0, {int(c) for c in args.client_cores.split(",")})
    try:
        wait_ok("http://127.0.0.1:8401/readyz")
        url = "http://127.0.0.1:8400/v1/embeddings"
        for _ in range(2):
            for name, make in (("aiohttp", AiohttpSender), ("aiohttp-tuned", TunedAiohttp), ("pooled", PooledSender)):
                rps, ms, bad = uvloop.run(measure(make(timeout_s=10, connect_timeout_s=0.5), url, args.conns,
                                                  args.duration))
                load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
                print(f"{name:14s} {rps:8,.0f} req/s  client CPU {ms:.4f} ms/request  non-200 {bad}  load {load}",
                      flush=True)
    finally:
        os.killpg(edge.pid, signal.SIGTERM)
        edge.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
