"""The gpu data plane in feed processes (``edge.gpu_feed: workers``, what a GPU node runs), with its kernels
replaced by their CPU references and the real ONNX engine behind the fast front's ring.

Issue 15: one process held the plane to ~2,500 req/s on the H200. Here three feed processes share the
port; what must hold across them: a key's limit once per node on the kernels' hot path, answers that are
the real model's, the node's ``/readyz`` summing every feed's counters, and a dead feed replaced.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import psutil
import pytest

from tests.support.edge import EdgeProcess, gazsi

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

RPM = 40
REQUESTS = 120
CLIENTS = 12
FEEDS = 3
GPU_REFERENCE = [sys.executable, "-m", "tests.support.gpu_plane"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeProcess, str]]:
    data = tmp_path_factory.mktemp("gpu-feeds")
    key = json.loads(gazsi("keys", "--data-dir", str(data), "--json", "create", "--name", "feeds",
                          "--rpm", str(RPM)))["key"]
    edge = EdgeProcess(data, "--workers", str(FEEDS), "--backend", "onnx-cpu", command=GPU_REFERENCE,
                       env={"GAZSI_CACHE__ENABLED": "false"})
    try:
        yield edge, key
    finally:
        assert edge.stop() == 0, "".join(edge.lines)


def _feeds(edge: EdgeProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(edge.proc.pid).children(recursive=True)
            if "tests.support.gpu_worker" in " ".join(p.cmdline())]


async def test_a_key_gets_its_limit_once_across_feed_processes_on_the_hot_path(
        served: tuple[EdgeProcess, str], reference_model) -> None:
    edge, key = served
    assert len(_feeds(edge)) == FEEDS
    texts = [f"feed request {i} embedded on the ONNX engine" for i in range(REQUESTS)]
    # A connection per request: the kernel spreads them over the feed processes (SO_REUSEPORT).
    limits = httpx.Limits(max_keepalive_connections=0)
    clients = [httpx.AsyncClient(base_url=edge.url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=limits) for _ in range(CLIENTS)]
    try:
        async def client_run(c: httpx.AsyncClient, mine: list[str]) -> list[tuple[str, httpx.Response]]:
            return [(t, await c.get("/inference", params={"d": t})) for t in mine]

        started = time.monotonic()
        runs = await asyncio.gather(*(client_run(c, texts[i::CLIENTS]) for i, c in enumerate(clients)))
        span = time.monotonic() - started
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    replies = [pair for run in runs for pair in run]
    statuses = Counter(r.status_code for _, r in replies)
    print(f"{REQUESTS} requests over {FEEDS} feed processes in {span:.2f}s: {dict(statuses)}")
    assert set(statuses) <= {200, 429}, statuses
    # One bucket per node, refilled at RPM/60 per second; a bucket per feed process would pass 120.
    assert RPM <= statuses[200] <= RPM + int(span * RPM / 60) + 1, (statuses, span)
    ok = [(t, r.json()) for t, r in replies if r.status_code == 200]
    ref = reference_model.encode([t for t, _ in ok[:8]], normalize_embeddings=True)
    got = np.array([body["embedding_sample"] for _, body in ok[:8]], dtype=np.float32)
    assert np.abs(got - ref[:, :3]).max() < 1e-5  # the real model's vectors
    refused = next(r for _, r in replies if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "rate_limit_exceeded"

    await asyncio.sleep(1.5)  # each feed reports its counters once a second
    async with httpx.AsyncClient(timeout=10) as c:
        ready = (await c.get(edge.admin + "/readyz")).json()
    assert ready["dataplane"] == "gpu" and ready["transport"]["workers"] == FEEDS
    gpu = ready["transport"]["gpu"]
    # Every request parsed by the (reference) kernel, none sent to the CPU's parse; answered by the feeds
    # (edge.gpu_build: cpu, the default; the build kernel's way has its own rows in test_parity.py).
    assert gpu["requests"] >= REQUESTS and gpu["cpu"] == 0 and gpu["built"] == 0, gpu
    served_by = [w for w, stages in ready["transport"]["gpu_stages_us"].items() if stages]
    assert len(served_by) >= 2, served_by  # the load really went over several feed processes


async def test_a_dead_feed_process_is_replaced_and_the_node_keeps_serving(
        served: tuple[EdgeProcess, str]) -> None:
    edge, _ = served
    victim = _feeds(edge)[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    ready: dict = {}
    async with httpx.AsyncClient(timeout=10) as probe:
        while time.monotonic() < deadline:
            ready = (await probe.get(edge.admin + "/readyz")).json()
            if ready["transport"]["worker_restarts"] >= 1 and ready["transport"]["workers_alive"] == FEEDS \
                    and ready.get("ready"):
                break
            await asyncio.sleep(0.25)
    assert ready["transport"]["worker_restarts"] >= 1 and ready["transport"]["workers_alive"] == FEEDS, ready
    async with httpx.AsyncClient(base_url=edge.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0),
                                 headers={"Authorization": "Bearer gz_test_" + "A" * 43}) as c:
        answers = Counter([(await c.get("/inference", params={"d": f"after {i}"})).status_code for i in range(12)])
    assert answers == {401: 12}, answers  # every feed answers again (a bogus key: 401, not a dead socket)
