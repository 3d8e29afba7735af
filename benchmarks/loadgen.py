"""Closed-loop (fixed concurrency) and open-loop (fixed arrival rate) HTTP load with latency percentiles.

The mean batch size comes from the server's own Prometheus histogram (``gazsi_batch_size``),
read before and after the run, so it is what the batcher really did. An open-loop run bounds its
outstanding requests (``max_outstanding``): arrivals beyond it count as ``dropped``, never queue
without bound in the client.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np

__all__ = ["SENTENCES", "BenchResult", "LoadSpec", "long_text", "run_load", "scrape_batch_stats"]

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Embeddings turn text into vectors for search.",
    "A fast inference network serves users nearby.",
    "Rain is expected across the northern hills tonight.",
    "She ordered a coffee and opened her laptop.",
    "GPUs batch many small requests into one call.",
    "The museum opens at nine on weekdays.",
    "Latency matters more than throughput for chat.",
    "He planted tomatoes along the garden fence.",
    "Our edge nodes answer from the closest city.",
    "The train to Vienna leaves in ten minutes.",
    "Vector databases index embeddings for retrieval.",
]


def long_text(i: int, words: int = 100) -> str:
    """About 128 tokens of varied text."""
    rng = random.Random(i)
    return " ".join(rng.choice(SENTENCES).split()[rng.randrange(3)] for _ in range(words))


@dataclass
class LoadSpec:
    url: str
    endpoint: str = "embeddings"  # embeddings | inference
    model: str = "all-MiniLM-L6-v2"
    inputs_per_request: int = 1
    long_inputs: bool = False
    concurrency: int = 32
    rate: float | None = None  # requests/s for open loop; None = closed loop
    duration_s: float = 10.0
    warmup_s: float = 1.0
    api_key: str | None = None
    max_outstanding: int = 4096
    connections: int = 0  # 0 = concurrency (closed) or 512 (open)
    # 0: every request's inputs are new (no response-cache hits); N: cycle N payloads (to measure the cache).
    repeat_every: int = 0
    metrics_url: str | None = None  # where /metrics is (the fast front's operator port); default: url


@dataclass
class BenchResult:
    spec: dict[str, Any]
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    duration_s: float = 0.0
    throughput_rps: float = 0.0
    inputs_per_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    mean_batch_size: float | None = None

    def summary(self) -> str:
        mb = f"{self.mean_batch_size:.1f}" if self.mean_batch_size is not None else "n/a"
        errs = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"requests={self.requests} ok={self.ok} errors: {errs} dropped={self.dropped}\n"
            f"throughput={self.throughput_rps:.1f} req/s ({self.inputs_per_s:.1f} inputs/s) "
            f"p50={self.p50_ms:.2f}ms p95={self.p95_ms:.2f}ms p99={self.p99_ms:.2f}ms "
            f"mean_batch={mb}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


_HIST = re.compile(r"^gazsi_batch_size_(sum|count)\s+([0-9.eE+-]+)$", re.M)


async def scrape_batch_stats(session: aiohttp.ClientSession, base_url: str) -> tuple[float, float] | None:
    """(sum, count) of the server's batch-size histogram, or None if it has no /metrics."""
    try:
        async with session.get(f"{base_url}/metrics") as r:
            if r.status != 200:
                return None
            text = await r.text()
    except aiohttp.ClientError:
        return None
    found = dict((k, float(v)) for k, v in _HIST.findall(text))
    if "sum" not in found:
        return None
    return found["sum"], found["count"]


def _payload(spec: LoadSpec, i: int) -> tuple[str, str, bytes | None]:
    texts = [
        long_text(i * 131 + j) + f" #{i}" if spec.long_inputs else f"{SENTENCES[(i + j) % len(SENTENCES)]} #{i}-{j}"
        for j in range(spec.inputs_per_request)
    ]
    if spec.endpoint == "inference":
        from urllib.parse import quote

        return "GET", f"{spec.url}/inference?d={quote(texts[0])}", None
    body = json.dumps({"input": texts if len(texts) > 1 else texts[0], "model": spec.model}).encode()
    return "POST", f"{spec.url}/v1/embeddings", body


async def run_load(spec: LoadSpec) -> BenchResult:
    """Drive the load and measure; see the module docstring for the two modes."""
    headers = {"Content-Type": "application/json"}
    if spec.api_key:
        headers["Authorization"] = f"Bearer {spec.api_key}"
    cycle = [_payload(spec, i) for i in range(spec.repeat_every)]
    limit = spec.connections or (spec.concurrency if spec.rate is None else 512)
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    latencies: list[float] = []
    result = BenchResult(spec=asdict(spec))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        counter = 0
        measuring = False

        async def one() -> None:
            nonlocal counter
            method, url, body = cycle[counter % len(cycle)] if cycle else _payload(spec, counter)
            counter += 1
            t = time.perf_counter()
            try:
                async with session.request(method, url, data=body) as r:
                    await r.read()
                    status = r.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                if measuring:
                    key = type(exc).__name__
                    result.errors[key] = result.errors.get(key, 0) + 1
                return
            if not measuring:
                return
            result.requests += 1
            if status == 200:
                result.ok += 1
                latencies.append(time.perf_counter() - t)
            else:
                result.errors[str(status)] = result.errors.get(str(status), 0) + 1

        async def closed_worker(stop_at: float) -> None:
            while time.perf_counter() < stop_at:
                await one()

        async def drive(duration: float) -> None:
            stop_at = time.perf_counter() + duration
            if spec.rate is None:
                await asyncio.gather(*[closed_worker(stop_at) for _ in range(spec.concurrency)])
                return
            outstanding: set[asyncio.Task[None]] = set()
            interval = 1.0 / spec.rate
            next_at = time.perf_counter()
            while next_at < stop_at:
                now = time.perf_counter()
                if now < next_at:
                    await asyncio.sleep(next_at - now)
                next_at += interval
                if len(outstanding) >= spec.max_outstanding:
                    if measuring:
                        result.dropped += 1
                    continue
                task = asyncio.create_task(one())
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            if outstanding:
                await asyncio.gather(*outstanding)

        if spec.warmup_s > 0:
            await drive(spec.warmup_s)
        before = await scrape_batch_stats(session, spec.metrics_url or spec.url)
        measuring = True
        started = time.perf_counter()
        await drive(spec.duration_s)
        result.duration_s = time.perf_counter() - started
        measuring = False
        after = await scrape_batch_stats(session, spec.metrics_url or spec.url)
    if before and after and after[1] > before[1]:
        result.mean_batch_size = (after[0] - before[0]) / (after[1] - before[1])
    if latencies:
        arr = np.array(latencies) * 1000
        result.p50_ms, result.p95_ms, result.p99_ms = (float(np.percentile(arr, q)) for q in (50, 95, 99))
        result.mean_ms = float(arr.mean())
    result.throughput_rps = result.ok / result.duration_s if result.duration_s else 0.0
    result.inputs_per_s = result.throughput_rps * spec.inputs_per_request
    return result
