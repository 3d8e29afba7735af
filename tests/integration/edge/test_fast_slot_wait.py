"""The fast front under a burst larger than its ring slots, with the real model on ONNX Runtime CPU
(`gazsi edge serve`, one worker): requests wait for a slot instead of a 429 storm, and past the
waiting bound the answer is 429 with ``Retry-After`` and an OpenAI-style body, never a hang."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support.edge import EdgeProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "all-MiniLM-L6-v2"


async def _burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json={"model": MODEL, "input": f"burst {i}"})
                                      for i in range(n)))


def _edge(tmp_path: Path, **edge: str) -> EdgeProcess:
    env = {f"GAZSI_EDGE__{k.upper()}": v for k, v in edge.items()}
    return EdgeProcess(tmp_path / "data", "--dataplane", "fast", "--workers", "1", "--backend", "onnx-cpu",
                       "--no-auth", env={"GAZSI_CACHE__ENABLED": "false", **env})


async def test_a_burst_over_the_slots_waits_and_every_request_is_answered(tmp_path: Path) -> None:
    edge = _edge(tmp_path, ring_slots_per_worker="2", ring_slot_wait_s="30")
    try:
        replies = await _burst(edge.url, 24)  # 12x the worker's slots, all at once
        assert [r.status_code for r in replies] == [200] * 24, [r.text[:200] for r in replies if r.status_code != 200]
        assert all(len(r.json()["data"][0]["embedding"]) == 384 for r in replies)
    finally:
        edge.stop()


async def test_past_the_waiting_bound_it_is_429_with_retry_after(tmp_path: Path) -> None:
    # One slot and nobody may wait: every request that finds the slot taken is refused at once.
    edge = _edge(tmp_path, ring_slots_per_worker="1", ring_waiters_per_worker="0")
    try:
        replies = await _burst(edge.url, 32)
        codes = {r.status_code for r in replies}
        assert codes <= {200, 429} and 429 in codes and 200 in codes, codes
        for r in replies:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
        # Refusals lose nothing: the node still answers once the burst is over.
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
            again = await client.post("/v1/embeddings", json={"model": MODEL, "input": "after the burst"})
        assert again.status_code == 200
    finally:
        edge.stop()
