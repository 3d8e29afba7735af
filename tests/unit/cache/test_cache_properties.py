"""Property tests of the response cache against the uncached path: any mix of cached, uncached,
duplicated and concurrently requested inputs comes back complete, in request order, equal to what
the engine computes without a cache, and bills (``computed_tokens``) exactly the inputs that ran.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gazsi_cluster.cache import LocalLRUBackend, ResponseCache

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

NS = "all-MiniLM-L6-v2:weights"


def embed(seq: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the model: distinct inputs get distinct vectors."""
    rng = np.random.default_rng(abs(hash(seq.tobytes())) % 2**32)
    return rng.standard_normal(8).astype(np.float32)


class Engine:
    """Records every input it was asked to compute."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.ran: list[tuple[int, ...]] = []
        self.delay_s = delay_s

    async def __call__(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, int]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.ran.extend(tuple(int(t) for t in s) for s in seqs)
        return np.stack([embed(s) for s in seqs]), len(seqs)


# Small vocabularies and short sequences, so requests often repeat an input and share items.
token_seqs = st.lists(st.integers(1, 4), min_size=1, max_size=5).map(lambda xs: np.array([101, *xs, 102]))
requests = st.lists(token_seqs, min_size=1, max_size=12)


def as_key(seq: np.ndarray) -> tuple[int, ...]:
    return tuple(int(t) for t in seq)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(warm=st.lists(token_seqs, max_size=8), request=requests, use_cache=st.booleans())
def test_mixed_request_matches_uncached_path_and_bills_what_ran(
    warm: list[np.ndarray], request: list[np.ndarray], use_cache: bool
) -> None:
    async def scenario() -> None:
        cache, engine = ResponseCache(LocalLRUBackend(1000), ttl_s=60), Engine()
        if warm:
            await cache.resolve(NS, warm, engine)
        engine.ran.clear()
        result = await cache.resolve(NS, request, engine, use_cache=use_cache)

        uncached = np.stack([embed(s) for s in request])
        np.testing.assert_array_equal(result.vectors, uncached)  # every vector, in request order

        cached_before = {as_key(s) for s in warm} if use_cache else set()
        distinct = list(dict.fromkeys(as_key(s) for s in request))
        must_run = [k for k in distinct if k not in cached_before]
        assert engine.ran == must_run  # each missing input once, nothing cached recomputed
        assert result.computed_items == len(must_run)
        assert result.computed_tokens == sum(len(k) for k in must_run)
        assert result.total_tokens == sum(len(s) for s in request)
        assert result.cached_tokens == result.total_tokens - result.computed_tokens
        hits = sum(as_key(s) in cached_before for s in request)
        assert result.status == ("hit" if hits == len(request) else "miss" if hits == 0 else "partial")

    asyncio.run(scenario())


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(requests, min_size=2, max_size=4), warm=st.lists(token_seqs, max_size=4))
def test_concurrent_requests_compute_each_input_once_and_bill_it_once(
    batch: list[list[np.ndarray]], warm: list[np.ndarray]
) -> None:
    async def scenario() -> None:
        cache, engine = ResponseCache(LocalLRUBackend(1000), ttl_s=60), Engine(delay_s=0.002)
        if warm:
            await cache.resolve(NS, warm, engine)
        engine.ran.clear()
        results = await asyncio.gather(*(cache.resolve(NS, r, engine) for r in batch))
        for request, result in zip(batch, results, strict=True):
            np.testing.assert_array_equal(result.vectors, np.stack([embed(s) for s in request]))
        cached_before = {as_key(s) for s in warm}
        wanted = {as_key(s) for r in batch for s in r} - cached_before
        # Coalescing: every input computed exactly once across all the requests...
        assert sorted(engine.ran) == sorted(wanted)
        # ...and billed to exactly one of them.
        assert sum(r.computed_tokens for r in results) == sum(len(k) for k in wanted)
        assert sum(r.computed_items for r in results) == len(wanted)

    asyncio.run(scenario())
