"""Response cache: 80% repeated inputs, cache on vs off, through the edge app (same run).

    .venv/bin/python benchmarks/cache_bench.py [--requests 2000] [--concurrency 16] [--delay-ms 20] [--rounds 3]

Uses the FakeEngine (deterministic vectors, ``--delay-ms`` of simulated engine time per batch),
not the ONNX model, so the number shows the cache path's effect, not model speed. Requests go
through a whole edge node (auth off, the asgi transport on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time

import httpx

from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.config import load_settings

MODEL = "all-MiniLM-L6-v2"


def workload(n: int, repeat: float, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    hot = [f"popular query number {i}" for i in range(50)]
    return [rng.choice(hot) if rng.random() < repeat else f"unique query {i} {rng.random()}" for i in range(n)]


async def run(cache_on: bool, texts: list[str], concurrency: int, delay_s: float) -> tuple[float, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=tmp, engine={"backend": "fake"}, auth={"enabled": False},
                                 cache={"enabled": cache_on}, edge={"dataplane": "asgi", "port": 0})
        engine = FakeEngine(delay_s=delay_s)
        node = EdgeNode(settings, engine=engine)
        await node.start()
        assert node.runtime is not None
        await node.runtime.wait_loaded()
        counts: dict[str, int] = {}
        queue = list(texts)
        try:
            async with httpx.AsyncClient(base_url=node.url) as c:
                async def worker() -> None:
                    while queue:
                        text = queue.pop()
                        r = await c.post("/v1/embeddings", json={"input": text, "model": MODEL})
                        r.raise_for_status()
                        tag = r.headers.get("x-gazsi-cache", "off")
                        counts[tag] = counts.get(tag, 0) + 1

                started = time.perf_counter()
                await asyncio.gather(*[worker() for _ in range(concurrency)])
                elapsed = time.perf_counter() - started
        finally:
            await node.stop()
        counts["engine_calls"] = len(engine.calls)
        return len(texts) / elapsed, counts


async def main(args: argparse.Namespace) -> None:
    texts = workload(args.requests, args.repeat)
    results: dict[bool, list[float]] = {False: [], True: []}
    # Rounds alternate off/on so load from other processes on a shared machine hits both alike.
    for round_no in range(args.rounds):
        for cache_on in (False, True):
            rps, counts = await run(cache_on, texts, args.concurrency, args.delay_ms / 1000.0)
            results[cache_on].append(rps)
            print(f"round {round_no}  cache={'on ' if cache_on else 'off'}  requests={len(texts)}  "
                  f"repeat={args.repeat:.0%}  concurrency={args.concurrency}  engine_delay={args.delay_ms}ms"
                  f"  -> {rps:8.1f} req/s  {counts}")
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"median: cache off {off:.1f} req/s, cache on {on:.1f} req/s, speed-up x{on / off:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeat", type=float, default=0.8)
    p.add_argument("--delay-ms", type=float, default=20.0, help="simulated engine time per batch")
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(p.parse_args()))
