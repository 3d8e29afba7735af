"""The fast front's shared-memory ring and the worker's ring embedder, without sockets or processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from edge_node.embedders import Timing
from edge_node.transports.fast.ring import (
    DOWN_MARKER,
    ENGINE_FAILED,
    ENGINE_LOADING,
    ENGINE_UP,
    RingLayout,
    SlotRing,
    pack_indices,
    unpack_indices,
)
from edge_node.transports.fast.ring_embedder import RingEmbedder
from gazsi_cluster.errors import DeadlineExceeded, EngineError, Overloaded, ServiceUnavailable

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

LAYOUT = RingLayout(workers=2, slots_per_worker=2, slot_inputs=4, slot_tokens=64, dimensions=8)


@pytest.fixture
def ring() -> Iterator[SlotRing]:
    r = SlotRing.create(LAYOUT)
    yield r
    r.close()


def test_indices_round_trip() -> None:
    idx = [0, 3, 7, DOWN_MARKER]
    assert unpack_indices(pack_indices(idx)) == idx
    assert unpack_indices(pack_indices(idx) + b"\x01") == idx  # a stray partial word is ignored


def test_layout_arrays_do_not_overlap() -> None:
    spans = sorted(LAYOUT.offsets().values())
    for (a, size), (b, _) in itertools.pairwise(spans):
        assert a + size <= b and b % 64 == 0
    assert LAYOUT.worker_of(0) == 0 and LAYOUT.worker_of(3) == 1


def test_request_and_result_round_trip_through_an_attached_view(ring: SlotRing) -> None:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 30000, size=n).astype(np.int64) for n in (3, 1, 9)]
    ring.set_state(ENGINE_UP, generation=4)
    ring.write_request(2, seqs, deadline=123.5)
    other = SlotRing.attach(LAYOUT, ring.name)
    try:
        got = other.read_request(2)
        assert [g.tolist() for g in got] == [s.tolist() for s in seqs]
        assert int(other.meta[2, 0]) == 4 and other.deadline[2] == 123.5
        vecs = rng.standard_normal((3, 8)).astype(np.float32)
        other.write_result(2, vecs, batch_size=5, inference_us=77, cache="miss")
        assert np.array_equal(ring.vectors[2, :3], vecs)
        other.write_error(1, "Overloaded", "full ü", "input", 1.5)
        assert ring.read_error(1) == ("Overloaded", "input", "full ü", 1.5)
    finally:
        other.close()


def _embedder(ring: SlotRing, timeout_s: float = 2.0, **slot_wait: float) -> tuple[RingEmbedder, int]:
    # slot_wait: slot_wait_s, max_waiters, flush_slots
    r, w = os.pipe()
    os.set_blocking(r, False)
    return RingEmbedder(ring, 0, w, timeout_s, **slot_wait), r  # type: ignore[arg-type]


async def _engine_once(emb: RingEmbedder, ring: SlotRing, req_fd: int) -> list[int]:
    """A stand-in node: answer every queued slot with a constant vector."""
    for _ in range(200):
        try:
            data = os.read(req_fd, 4096)
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        slots = unpack_indices(data)
        for slot in slots:
            n = int(ring.meta[slot, 1])
            ring.write_result(slot, np.ones((n, 8), np.float32) / np.sqrt(8), 1, 10, None)
        emb.on_responses(data)
        return slots
    raise AssertionError("nothing was sent through the ring")


def _seqs(*lengths: int) -> list[np.ndarray]:
    return [np.arange(1, n + 1, dtype=np.int64) for n in lengths]


async def test_embedding_goes_through_the_ring(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring)
    task = asyncio.create_task(emb.embed(_seqs(4, 2), Timing()))
    await _engine_once(emb, ring, req_fd)
    done = await task
    assert done.vectors.shape == (2, 8) and done.batch_size == 1 and done.inference_us == 10
    assert len(emb._free) == LAYOUT.slots_per_worker  # the slot came back


async def test_a_request_larger_than_a_slot_spans_several(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring)
    task = asyncio.create_task(emb.embed(_seqs(*([3] * 6)), Timing()))  # 6 inputs, 4 per slot
    assert len(await _engine_once(emb, ring, req_fd)) == 2  # both slots in one write, not one after the other
    assert (await task).vectors.shape == (6, 8)


async def test_a_many_slot_request_takes_a_window_of_slots_at_a_time() -> None:
    ring = SlotRing.create(RingLayout(workers=1, slots_per_worker=8, slot_inputs=4, slot_tokens=64, dimensions=8))
    try:
        ring.set_state(ENGINE_UP, generation=1)
        emb, req_fd = _embedder(ring)
        task = asyncio.create_task(emb.embed(_seqs(*([3] * 24)), Timing()))  # 24 inputs, 4 per slot: 6 slots
        assert len(await _engine_once(emb, ring, req_fd)) == 4  # a window of four (of 8 slots), then the other two
        assert len(await _engine_once(emb, ring, req_fd)) == 2
        assert (await task).vectors.shape == (24, 8)
        assert len(emb._free) == 8  # every slot back
    finally:
        ring.close()


async def test_no_free_slot_waits_then_429_with_retry_after(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, _ = _embedder(ring, slot_wait_s=0.1)
    emb._free.clear()
    start = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await emb.embed(_seqs(2), Timing())
    assert 0.1 <= time.monotonic() - start < 0.5  # waited for a slot, bounded by slot_wait_s
    assert info.value.retry_after == 1.0
    assert emb.slot_waiters == 0  # the expired waiter no longer counts


async def test_a_freed_slot_goes_to_the_oldest_waiter(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring)
    held = list(emb._free)
    emb._free.clear()  # every slot busy
    order: list[int] = []

    async def one(i: int) -> None:
        await emb.embed(_seqs(2), Timing())
        order.append(i)

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.01)  # arrival order 0, 1, 2
    assert emb.slot_waiters == 3
    emb._release(held[0])  # one slot comes back: each answered request hands it to the next waiter
    for _ in range(3):
        assert len(await _engine_once(emb, ring, req_fd)) == 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and emb.slot_waiters == 0


async def test_a_newcomer_does_not_overtake_a_waiter(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring)
    held = list(emb._free)
    emb._free.clear()
    first = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    await asyncio.sleep(0.01)
    emb._release(held[0])  # handed to the waiter, not left on the free list
    assert emb._free == []
    late = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    await asyncio.sleep(0.01)
    assert emb.slot_waiters == 1  # the newcomer queues
    await _engine_once(emb, ring, req_fd)
    await first
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    assert emb.slot_waiters == 0


async def test_past_the_waiter_bound_429_at_once(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, _ = _embedder(ring, slot_wait_s=5.0, max_waiters=2)
    emb._free.clear()
    waiting = [asyncio.create_task(emb.embed(_seqs(2), Timing())) for _ in range(2)]
    await asyncio.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(Overloaded):
        await emb.embed(_seqs(2), Timing())
    assert time.monotonic() - start < 0.1
    emb.fail_all()  # the engine went: the waiters get 503, not a hang
    for t in waiting:
        with pytest.raises(ServiceUnavailable):
            await t


async def test_a_cancelled_waiter_handed_a_slot_passes_it_on(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, _ = _embedder(ring)
    held = list(emb._free)
    emb._free.clear()
    a = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    b = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    await asyncio.sleep(0.01)
    emb._release(held[0])  # a's future has the slot...
    a.cancel()  # ...but a's client left before a ran
    with pytest.raises(asyncio.CancelledError):
        await a
    await asyncio.sleep(0.01)
    assert emb.slot_waiters == 0 and held[0] in emb._waiting  # b got it and sent it to the node
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b


async def test_down_marker_fails_in_flight_with_503(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, _ = _embedder(ring)
    task = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    await asyncio.sleep(0.05)
    emb.on_responses(pack_indices([DOWN_MARKER]))
    with pytest.raises(ServiceUnavailable):
        await task
    assert len(emb._free) == LAYOUT.slots_per_worker


@pytest.mark.parametrize(("state", "words"), [(ENGINE_LOADING, "loading"), (ENGINE_FAILED, "failed")])
async def test_not_ready_is_503(ring: SlotRing, state: int, words: str) -> None:
    ring.set_state(state)
    emb, _ = _embedder(ring)
    with pytest.raises(ServiceUnavailable, match=words):
        await emb.embed(_seqs(2), Timing())


async def test_deadline_gives_504_cancels_the_slot_and_reclaims_it_when_answered(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring, timeout_s=0.05)
    with pytest.raises(DeadlineExceeded):
        await emb.embed(_seqs(2), Timing())
    assert len(emb._free) == LAYOUT.slots_per_worker - 1  # the node still owns it...
    (slot,) = await _engine_once(emb, ring, req_fd)
    assert ring.deadline[slot] == 0.0  # ...and was told to drop it (the batcher skips expired slots)
    assert len(emb._free) == LAYOUT.slots_per_worker


@pytest.mark.parametrize(("flush_slots", "per_write"), [(0, None), (1, 1), (3, 3)])
async def test_slots_filled_in_one_loop_turn_go_to_the_node_in_one_write(
        ring: SlotRing, monkeypatch, flush_slots: int, per_write: int | None) -> None:
    """flush_slots 0: one write per loop turn; N: a write as soon as N slots wait, the rest at the turn's end."""
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring, flush_slots=flush_slots)
    writes: list[int] = []
    real_write = os.write

    def counting(fd: int, data: bytes) -> int:
        if fd == emb.req_fd:
            writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting)
    n = LAYOUT.slots_per_worker
    tasks = [asyncio.create_task(emb.embed(_seqs(2), Timing())) for _ in range(n)]
    await asyncio.sleep(0.01)
    data = os.read(req_fd, 4096)
    assert len(unpack_indices(data)) == n
    if per_write is None:
        assert writes == [4 * n]  # one write: one wake-up of the node, not one per request
    else:
        full, rest = divmod(n, per_write)
        assert writes == [4 * per_write] * full + ([4 * rest] if rest else [])
    for slot in unpack_indices(data):
        ring.write_result(slot, np.ones((1, 8), np.float32) / np.sqrt(8), n, 10, None)
    emb.on_responses(data)
    assert [(await t).batch_size for t in tasks] == [n] * n
    assert len(emb._free) == LAYOUT.slots_per_worker


async def test_a_write_per_slot_schedules_no_end_of_turn_flush(ring: SlotRing, monkeypatch) -> None:
    """flush_slots 1 writes each slot at once: nothing is left for an end-of-turn callback to do, so none is
    scheduled (issue 13: a call_soon per request that found an empty outbox); flush_slots 0 schedules one per turn."""
    ring.set_state(ENGINE_UP, generation=1)
    for flush_slots, scheduled in ((1, 0), (0, 1)):
        emb, req_fd = _embedder(ring, flush_slots=flush_slots)
        loop = asyncio.get_running_loop()
        calls: list[object] = []
        real = loop.call_soon

        def counting(cb, *args, _real=real, _emb=emb, _calls=calls, **kw):  # type: ignore[no-untyped-def]
            if getattr(cb, "__self__", None) is _emb:
                _calls.append(cb)
            return _real(cb, *args, **kw)

        monkeypatch.setattr(loop, "call_soon", counting)
        n = LAYOUT.slots_per_worker  # all in one loop turn (one more would wait for a slot, in a later turn)
        tasks = [asyncio.create_task(emb.embed(_seqs(2), Timing())) for _ in range(n)]
        slots: list[int] = []
        while len(slots) < n:
            slots += await _engine_once(emb, ring, req_fd)
        for t in tasks:
            await t
        monkeypatch.setattr(loop, "call_soon", real)
        assert len(calls) == scheduled
        assert len(emb._free) == LAYOUT.slots_per_worker


async def test_a_failed_write_is_503_and_frees_the_slot(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    r, w = os.pipe()
    os.close(r)  # the node's end is gone: the write fails with EPIPE
    emb = RingEmbedder(ring, 0, w, 2.0)
    with pytest.raises(ServiceUnavailable, match="restarting"):
        await emb.embed(_seqs(2), Timing())
    assert len(emb._free) == LAYOUT.slots_per_worker and sorted(set(emb._free)) == sorted(emb._free)
    os.close(w)


async def test_the_deadline_sweep_runs_only_while_requests_are_in_flight(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring, timeout_s=0.2)  # swept every 10 ms
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"0\.2s request deadline"):
        await emb.embed(_seqs(2), Timing())
    assert 0.2 <= time.monotonic() - start < 0.2 + 0.5
    await _engine_once(emb, ring, req_fd)
    await asyncio.sleep(0.05)
    assert emb._sweeper is None  # nothing in flight: no timer left running
    task = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    await _engine_once(emb, ring, req_fd)
    assert (await task).vectors.shape == (1, 8)  # answered in time: the sweep left it alone


async def test_a_failed_slot_raises_the_error_the_node_wrote(ring: SlotRing) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    emb, req_fd = _embedder(ring)
    task = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    for _ in range(100):
        try:
            data = os.read(req_fd, 4096)
            break
        except BlockingIOError:
            await asyncio.sleep(0.005)
    (slot,) = unpack_indices(data)
    ring.write_error(slot, "Overloaded", "queue full", None, 2.0)
    emb.on_responses(data)
    with pytest.raises(Overloaded) as info:
        await task
    assert info.value.retry_after == 2.0
    # A name that is not one of ours never becomes an arbitrary class: it is an engine error.
    task = asyncio.create_task(emb.embed(_seqs(2), Timing()))
    await asyncio.sleep(0.02)
    data = os.read(req_fd, 4096)
    (slot,) = unpack_indices(data)
    ring.write_error(slot, "os", "nope", None, 0.0)
    emb.on_responses(data)
    with pytest.raises(EngineError):
        await task


def test_package_surface_is_pinned() -> None:
    import edge_node.transports.fast as fast

    assert fast.__all__ == ["FastTransport", "RingLayout", "SlotRing", "default_workers"]
