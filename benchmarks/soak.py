"""Soak: mixed hostile and friendly traffic against local `gazsi edge serve` processes for a while.

    .venv/bin/python benchmarks/soak.py --minutes 10 [--edges 2] [--concurrency 8] [--backend fake]

Starts a throwaway redis-server (shared limits, key cache and revocation) and ``--edges``
``gazsi edge serve`` processes sharing one SQLite key store, creates a normal key, a key with
a low rpm (bursts over it), and a revoked key, then sends a mix: valid requests from a small
text pool (response-cache hits), invalid bodies, unknown/missing keys, the revoked key, and the
limited key. Every answer is classed as expected (its status is what that kind must get) or
unexpected (anything else, including 5xx and connection errors). RSS of every edge process is
sampled every 5 s; latency of valid requests is reported as p50/p99 per minute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests.support and benchmarks import from the root

from tests.support.services import ThrowawayRedis, free_port  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
# kind -> statuses that kind must get; anything else is unexpected.
EXPECTED: dict[str, set[int]] = {
    "valid": {200},
    "cache_hit": {200},
    "invalid_body": {400},
    "too_many_inputs": {400},
    "oversized_body": {413},
    "no_key": {401},
    "unknown_key": {401},
    "revoked_key": {401},
    "over_limit_burst": {200, 429},
}
WEIGHTS = {"valid": 40, "cache_hit": 25, "invalid_body": 5, "too_many_inputs": 3, "oversized_body": 2,
           "no_key": 5, "unknown_key": 5, "revoked_key": 5, "over_limit_burst": 10}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def make_keys(settings: Any) -> dict[str, str]:
    auth = build_authorizer(settings)
    await auth.start()
    try:
        good = await auth.admin.create(name="soak")
        limited = await auth.admin.create(name="soak-limited", rpm=60)
        revoked = await auth.admin.create(name="soak-revoked")
        await auth.admin.revoke(revoked.record.id)
    finally:
        await auth.close()
    return {"good": good.key, "limited": limited.key, "revoked": revoked.key}


def start_edges(n: int, data_dir: Path, redis_url: str, backend: str) -> list[tuple[subprocess.Popen[bytes], int]]:
    env = dict(os.environ, GAZSI_AUTH__REDIS_URL=redis_url, GAZSI_AUTH__KEY_ENV="soak",
               GAZSI_LIMITS__MAX_INPUTS_PER_REQUEST="64", GAZSI_LIMITS__MAX_BODY_BYTES="65536")
    edges = []
    for i in range(n):
        port = free_port()
        log = open(data_dir / f"edge{i}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve",
             "--port", str(port), "--backend", backend, "--data-dir", str(data_dir)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        edges.append((proc, port))
    deadline = time.monotonic() + 120
    for proc, port in edges:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"edge on port {port} did not become ready")
            time.sleep(0.2)
    return edges


def build(kind: str, keys: dict[str, str], pool: list[str]) -> tuple[dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {keys['good']}", "Content-Type": "application/json"}
    body: Any = {"model": MODEL, "input": f"soak {random.random()} {'x' * random.randint(1, 200)}"}
    if kind == "cache_hit":
        body["input"] = random.choice(pool)
    elif kind == "invalid_body":
        return headers, random.choice([b"{not json", b'{"model": "%s", "input": []}' % MODEL.encode(),
                                       b'{"input": 5}', b"[]"])
    elif kind == "too_many_inputs":
        body["input"] = ["a"] * 65
    elif kind == "oversized_body":
        body["input"] = "y" * 70_000
    elif kind == "no_key":
        del headers["Authorization"]
    elif kind == "unknown_key":
        headers["Authorization"] = "Bearer gz_soak_" + "A" * 40
    elif kind == "revoked_key":
        headers["Authorization"] = f"Bearer {keys['revoked']}"
    elif kind == "over_limit_burst":
        headers["Authorization"] = f"Bearer {keys['limited']}"
    return headers, json.dumps(body).encode()


async def worker(urls: list[str], keys: dict[str, str], pool: list[str], until: float, stats: dict[str, Any],
                 t_start: float) -> None:
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < until:
            kind = random.choices(kinds, weights)[0]
            headers, body = build(kind, keys, pool)
            url = random.choice(urls)
            t0 = time.monotonic()
            try:
                r = await client.post(f"{url}/v1/embeddings", content=body, headers=headers)
                status: int | str = r.status_code
                shaped = r.status_code == 200 or "error" in r.json()
                stats["cache"][r.headers.get("x-gazsi-cache", "none")] += 1
            except (httpx.HTTPError, ValueError) as exc:
                status, shaped = type(exc).__name__, False
            dt = time.monotonic() - t0
            ok = isinstance(status, int) and status in EXPECTED[kind] and shaped
            stats["by_class"][("expected" if ok else "unexpected", kind, status)] += 1
            if kind in ("valid", "cache_hit") and status == 200:
                stats["lat"][int((t0 - t_start) // 60)].append(dt)


async def sample_rss(pids: list[int], until: float, out: dict[int, list[tuple[float, int]]], t_start: float) -> None:
    procs = [psutil.Process(p) for p in pids]
    while time.monotonic() < until:
        for p in procs:
            try:
                out[p.pid].append((time.monotonic() - t_start, p.memory_info().rss))
            except psutil.Error:
                out[p.pid].append((time.monotonic() - t_start, -1))
        await asyncio.sleep(5)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gazsi-soak-"))
    redis = ThrowawayRedis(work / "redis").start()
    edges: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        settings = load_settings(data_dir=str(work), auth={"redis_url": redis.url, "key_env": "soak"})
        keys = await make_keys(settings)
        edges = start_edges(args.edges, work, redis.url, args.backend)
        urls = [f"http://127.0.0.1:{port}" for _, port in edges]
        pool = [f"cached text number {i}" for i in range(200)]
        stats: dict[str, Any] = {"by_class": collections.Counter(), "lat": collections.defaultdict(list),
                                 "cache": collections.Counter()}
        rss: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
        t_start = time.monotonic()
        until = t_start + args.minutes * 60
        await asyncio.gather(
            sample_rss([p.pid for p, _ in edges], until, rss, t_start),
            *(worker(urls, keys, pool, until, stats, t_start) for _ in range(args.concurrency)),
        )
        alive = [p.poll() is None for p, _ in edges]
    finally:
        for proc, _ in edges:
            proc.terminate()
        for proc, _ in edges:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()
    by_class = stats["by_class"]
    expected = sum(n for (c, _, _), n in by_class.items() if c == "expected")
    unexpected = {f"{k}:{s}": n for (c, k, s), n in by_class.items() if c == "unexpected"}
    per_minute = [{"minute": m, "n": len(v), "p50_ms": round(pct(v, 0.5) * 1e3, 2),
                   "p99_ms": round(pct(v, 0.99) * 1e3, 2)} for m, v in sorted(stats["lat"].items())]
    memory = {}
    for pid, samples in rss.items():
        warm = [r for t, r in samples if t >= 60 and r > 0] or [r for _, r in samples if r > 0]
        memory[str(pid)] = {"rss_first_mb": round(warm[0] / 2**20, 1), "rss_last_mb": round(warm[-1] / 2**20, 1),
                            "rss_max_mb": round(max(warm) / 2**20, 1),
                            "growth_mb_after_warmup": round((warm[-1] - warm[0]) / 2**20, 1)}
    counts: collections.Counter[str] = collections.Counter()
    for (_c, k, s), n in by_class.items():
        counts[f"{k}:{s}"] += n
    return {"minutes": args.minutes, "edges": args.edges, "concurrency": args.concurrency, "backend": args.backend,
            "requests": sum(by_class.values()), "expected": expected, "unexpected": unexpected,
            "by_kind_status": dict(sorted(counts.items())), "x_gazsi_cache": dict(stats["cache"]), "latency_per_minute": per_minute, "memory": memory,
            "edges_alive_at_end": alive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backend", default="fake", choices=["fake", "onnx-cpu"])
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    sys.exit(1 if result["unexpected"] or not all(result["edges_alive_at_end"]) else 0)


if __name__ == "__main__":
    main()
