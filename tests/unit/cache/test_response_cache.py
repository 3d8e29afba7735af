"""Per-item response cache: hit/miss/partial, bypass, namespaces, coalescing, failure handling."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gazsi_cluster.cache import LocalLRUBackend, ResponseCache, item_key
from gazsi_cluster.errors import EngineError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Engine:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[int] = []
        self.delay_s = delay_s
        self.fail = False

    async def __call__(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, str]:
        self.calls.append(len(seqs))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise EngineError("boom")
        return np.stack([np.full(4, float(s.sum()), dtype=np.float32) for s in seqs]), "ran"


def seqs(*values: int) -> list[np.ndarray]:
    return [np.array([101, v, 102]) for v in values]


async def test_miss_then_hit_then_partial() -> None:
    cache, engine = ResponseCache(LocalLRUBackend(100), ttl_s=60), Engine()
    first = await cache.resolve("m:w", seqs(1, 2), engine)
    assert first.status == "miss" and first.computed == "ran" and engine.calls == [2]
    again = await cache.resolve("m:w", seqs(2, 1), engine)
    assert again.status == "hit" and again.computed is None and engine.calls == [2]
    np.testing.assert_array_equal(again.vectors, first.vectors[::-1])
    part = await cache.resolve("m:w", seqs(1, 3, 3), engine)
    assert part.status == "partial" and engine.calls == [2, 1]  # only the new item, once
    assert part.vectors[1][0] == 101 + 3 + 102
    assert cache.lookups.labels("hit")._value.get() == 3
    assert cache.lookups.labels("miss")._value.get() == 4


async def test_no_cache_bypasses_reads_and_other_weights_do_not_share() -> None:
    cache, engine = ResponseCache(LocalLRUBackend(100), ttl_s=60), Engine()
    await cache.resolve("m:w1", seqs(1), engine)
    assert (await cache.resolve("m:w1", seqs(1), engine, use_cache=False)).status == "miss"
    assert (await cache.resolve("m:w2", seqs(1), engine)).status == "miss"
    assert engine.calls == [1, 1, 1]
    assert item_key("m:w1", seqs(1)[0]) != item_key("m:w2", seqs(1)[0])


async def test_identical_in_flight_requests_are_coalesced() -> None:
    cache, engine = ResponseCache(LocalLRUBackend(100), ttl_s=60), Engine(delay_s=0.05)
    results = await asyncio.gather(*[cache.resolve("m:w", seqs(7), engine) for _ in range(5)])
    assert engine.calls == [1]
    assert cache.coalesced._value.get() == 4
    for r in results:
        np.testing.assert_array_equal(r.vectors, results[0].vectors)


async def test_leader_failure_reaches_followers_and_is_not_cached() -> None:
    cache, engine = ResponseCache(LocalLRUBackend(100), ttl_s=60), Engine(delay_s=0.05)
    engine.fail = True
    outcomes = await asyncio.gather(*[cache.resolve("m:w", seqs(9), engine) for _ in range(3)],
                                    return_exceptions=True)
    assert all(isinstance(o, EngineError) for o in outcomes)
    engine.fail = False
    assert (await cache.resolve("m:w", seqs(9), engine)).status == "miss"


async def test_cancelled_leader_lets_a_follower_compute() -> None:
    cache, engine = ResponseCache(LocalLRUBackend(100), ttl_s=60), Engine(delay_s=0.1)
    leader = asyncio.create_task(cache.resolve("m:w", seqs(5), engine))
    await asyncio.sleep(0.01)
    follower = asyncio.create_task(cache.resolve("m:w", seqs(5), engine))
    await asyncio.sleep(0.01)
    leader.cancel()
    result = await follower
    assert result.vectors.shape == (1, 4) and engine.calls == [1, 1]


async def test_lru_is_bounded_and_ttl_expires() -> None:
    backend = LocalLRUBackend(2)
    cache, engine = ResponseCache(backend, ttl_s=60), Engine()
    await cache.resolve("m:w", seqs(1, 2, 3), engine)
    assert len(backend) == 2
    await backend.set_many({"k": b"\x00" * 16}, ttl_s=0)
    assert (await backend.get_many(["k"])) == [None]
