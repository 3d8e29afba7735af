"""The batcher's written rules, each pinned by a test (edge_node/batcher.py docstring)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from edge_node.batcher import Batcher
from gazsi_cluster.config import BatcherConfig
from gazsi_cluster.errors import DeadlineExceeded, EngineError, Overloaded, ServiceUnavailable

pytestmark = pytest.mark.unit


class Recorder:
    """An embed function that records batch compositions; optional delay, failure and gate."""

    def __init__(self, delay: float = 0.0, dims: int = 4) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.dims = dims
        self.fail = 0
        self.bad_rows = False
        self.gate: threading.Event | None = None

    def __call__(self, seqs):
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append([len(s) for s in seqs])
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("boom")
        n = len(seqs) - (1 if self.bad_rows else 0)
        # Row i carries the input's length so tests can check results land on the right waiter.
        return np.array([[len(s)] * self.dims for s in seqs[:n]], dtype=np.float32)


def seq(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def make(fn, **cfg) -> Batcher:
    return Batcher(fn, BatcherConfig(**cfg), max_seq_len=256)


async def test_results_go_to_their_own_waiters() -> None:
    rec = Recorder()
    b = make(rec, max_batch_size=8, max_wait_us=2000)
    await b.start()
    futs = b.submit([seq(3), seq(5), seq(7)])
    out = await asyncio.gather(*futs)
    assert [int(r.embedding[0]) for r in out] == [3, 5, 7]
    assert out[0].batch.size == 3
    await b.stop()


async def test_batch_capped_by_count() -> None:
    rec = Recorder()
    b = make(rec, max_batch_size=4, max_wait_us=0)
    rec.gate = threading.Event()
    await b.start()
    futs = [f for _ in range(10) for f in b.submit([seq(4)])]
    rec.gate.set()
    await asyncio.gather(*futs)
    assert max(len(batch) for batch in rec.batches) <= 4
    assert sum(len(batch) for batch in rec.batches) == 10
    await b.stop()


async def test_waits_for_company_up_to_max_wait() -> None:
    rec = Recorder()
    b = make(rec, max_batch_size=8, max_wait_us=200_000)
    await b.start()
    first = b.submit([seq(4)])
    await asyncio.sleep(0.05)
    second = b.submit([seq(4)])
    await asyncio.gather(*first, *second)
    assert rec.batches == [[4, 4]]
    await b.stop()


async def test_max_wait_bounds_latency_of_a_lone_request() -> None:
    rec = Recorder()
    b = make(rec, max_batch_size=8, max_wait_us=20_000)
    await b.start()
    t = time.perf_counter()
    await asyncio.gather(*b.submit([seq(4)]))
    assert time.perf_counter() - t < 1.0
    assert rec.batches == [[4]]
    await b.stop()


async def test_token_budget_caps_batch() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    b = make(rec, max_batch_size=64, max_wait_us=0, max_batch_tokens=256)
    await b.start()
    futs = [f for _ in range(6) for f in b.submit([seq(100)])]
    rec.gate.set()
    await asyncio.gather(*futs)
    # 100 tokens each: at most 2 fit in 256 padded tokens.
    assert all(len(batch) * max(batch) <= 256 for batch in rec.batches)
    await b.stop()


async def test_similar_lengths_are_grouped() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    b = make(rec, max_batch_size=2, max_wait_us=0)
    await b.start()
    # The first call blocks on the gate; meanwhile a mix of lengths queues up.
    blocker = b.submit([seq(50)])
    await asyncio.sleep(0.05)
    futs = [f for n in (10, 200, 11, 201) for f in b.submit([seq(n)])]
    rec.gate.set()
    await asyncio.gather(*blocker, *futs)
    assert sorted(sorted(x) for x in rec.batches[1:]) == [[10, 11], [200, 201]]
    await b.stop()


async def test_full_queue_refuses_at_once() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    b = make(rec, max_batch_size=1, max_wait_us=0, queue_capacity=2)
    await b.start()
    a = b.submit([seq(4)])
    c = b.submit([seq(4)])
    with pytest.raises(Overloaded) as info:
        b.submit([seq(4)])
    assert info.value.retry_after > 0
    rec.gate.set()
    await asyncio.gather(*a, *c)
    # Admission is released once requests finish.
    await asyncio.gather(*b.submit([seq(4)]))
    await b.stop()


async def test_token_admission_limit() -> None:
    b = make(Recorder(), max_queued_tokens=100)
    await b.start()
    with pytest.raises(Overloaded):
        b.submit([seq(60), seq(60)])
    await b.stop()


async def test_expired_inputs_fail_with_deadline() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    b = make(rec, max_batch_size=1, max_wait_us=0)
    await b.start()
    blocker = b.submit([seq(4)])
    await asyncio.sleep(0.02)
    late = b.submit([seq(5)], timeout_s=0.01)
    await asyncio.sleep(0.05)
    rec.gate.set()
    await asyncio.gather(*blocker)
    with pytest.raises(DeadlineExceeded):
        await late[0]
    assert [5] not in rec.batches
    await b.stop()


async def test_cancelled_inputs_are_dropped_before_running() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    b = make(rec, max_batch_size=1, max_wait_us=0)
    await b.start()
    blocker = b.submit([seq(4)])
    await asyncio.sleep(0.02)
    gone = b.submit([seq(9)])
    gone[0].cancel()
    rec.gate.set()
    await asyncio.gather(*blocker)
    await asyncio.gather(*b.submit([seq(6)]))
    assert [9] not in rec.batches
    await b.stop()


async def test_engine_failure_fails_whole_batch_and_loop_survives() -> None:
    rec = Recorder()
    rec.fail = 1
    b = make(rec, max_batch_size=8, max_wait_us=10_000)
    await b.start()
    futs = b.submit([seq(3), seq(4)])
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, EngineError) for r in results)
    ok = await asyncio.gather(*b.submit([seq(3)]))
    assert int(ok[0].embedding[0]) == 3
    await b.stop()


async def test_wrong_row_count_fails_batch() -> None:
    rec = Recorder()
    rec.bad_rows = True
    b = make(rec, max_batch_size=8, max_wait_us=10_000)
    await b.start()
    results = await asyncio.gather(*b.submit([seq(3), seq(4)]), return_exceptions=True)
    assert all(isinstance(r, EngineError) for r in results)
    await b.stop()


async def test_inference_runs_off_the_event_loop() -> None:
    rec = Recorder(delay=0.2)
    b = make(rec, max_wait_us=0)
    await b.start()
    futs = b.submit([seq(4)])
    ticks = 0
    while not futs[0].done():
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks >= 5  # the loop kept turning while the engine slept
    await b.stop()


async def test_submit_after_stop_is_unavailable() -> None:
    b = make(Recorder())
    await b.start()
    await b.stop()
    with pytest.raises(ServiceUnavailable):
        b.submit([seq(3)])


@pytest.mark.parametrize(("depth", "expected"), [(1, 1), (2, 2)])
async def test_pipeline_depth_bounds_batches_in_flight(depth: int, expected: int) -> None:
    active = peak = 0
    lock = threading.Lock()
    both_in = threading.Barrier(expected, timeout=5)

    def fn(seqs):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        both_in.wait()  # with depth 2 both calls must be inside at once, or this times out
        with lock:
            active -= 1
        return np.zeros((len(seqs), 4), dtype=np.float32)

    b = make(fn, max_batch_size=1, max_wait_us=0, pipeline_depth=depth)
    await b.start()
    await asyncio.gather(*b.submit([seq(3)]), *b.submit([seq(3)]))
    assert peak == expected
    await b.stop()
