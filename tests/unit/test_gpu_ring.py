"""The ring's state machine and index queues, on a numpy buffer with the GPU half emulated (no GPU)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu.ring import HostRing, RingStateError
from tests.support.gpu_ring import EmulatedGpuSide

pytestmark = pytest.mark.unit


def _ring() -> tuple[HostRing, EmulatedGpuSide]:
    host = HostRing(np.zeros(L.RING_BYTES, dtype=np.uint8))
    return host, EmulatedGpuSide(host.v)


def test_layout_matches_ring_cu() -> None:
    src = (__import__("pathlib").Path(L.__file__).parent / "ring.cu").read_text()
    assert f"#define GZ_RING_N {L.RING_N}" in src and f"#define GZ_RING_OUT {L.RING_OUT}" in src
    assert f"#define P_TAG {L.P_TAG}" in src and f"#define P_NFIELDS {L.P_NFIELDS}" in src
    assert L.RO_TS % 8 == 0  # u64 timestamps must be aligned


def test_one_request_walks_every_state() -> None:
    host, gpu = _ring()
    assert host.counts()["FREE"] == L.RING_N
    slot = gpu.admit("héllo".encode(), keep_alive=True, tag=7)
    assert slot >= 0 and host.v.state[slot] == L.S_PARAM_READY
    assert host.pop_requests() == [slot]
    assert host.take(slot) == "héllo".encode()
    assert host.v.state[slot] == L.S_PROCESSING and host.v.param[slot, L.P_TAG] == 7
    host.complete(slot, tokens=5, batch_size=3, inference_us=42, sample=[0.1, 0.2, 0.3], infer_marks=(1.0, 2.0))
    assert host.v.state[slot] == L.S_RESULT_READY
    assert gpu.build_one() == slot
    assert host.response(slot) == b"tokens=5"
    host.release(slot)
    counts = host.counts()
    assert counts["FREE"] == L.RING_N and counts["errors"] == 0
    assert host.v.ts[slot, 4] == 10**9 and host.v.ts[slot, 5] == 2 * 10**9
    assert all(host.v.ts[slot, k] > 0 for k in (2, 3, 6, 8))


def test_a_burst_completes_together_as_each_would_alone() -> None:
    host, gpu = _ring()
    slots = [gpu.admit(f"t{i}".encode()) for i in range(3)]
    host.pop_requests()
    for slot in slots:
        host.take(slot)
    free = next(s for s in range(L.RING_N) if s not in slots)
    with pytest.raises(RingStateError):  # one slot not PROCESSING: nothing of the burst is published
        host.complete_many([slots[0], free], tokens=[1, 1],
                           batch_sizes=[1, 1], inference_us=[1, 1], samples=np.zeros((2, 3), np.float32),
                           infer_marks=[(0.0, 0.0)] * 2)
    assert all(host.v.state[s] == L.S_PROCESSING for s in slots)
    host.complete_many(slots, tokens=[5, 6, 7], batch_sizes=[3, 3, 3], inference_us=[42, 43, 2**40],
                       samples=np.arange(9, dtype=np.float32).reshape(3, 3), infer_marks=[(1.0, 2.0)] * 3)
    assert [gpu.build_one() for _ in slots] == slots  # queued for the builder in order
    assert [host.response(s) for s in slots] == [b"tokens=5", b"tokens=6", b"tokens=7"]
    assert host.v.param[slots[2], L.J_INFER_US] == 2**31 - 1
    assert host.v.sample[slots[1], :3].tolist() == [3.0, 4.0, 5.0]
    assert host.v.ts[slots[0], 4] == 10**9 and host.v.ts[slots[2], 5] == 2 * 10**9
    for slot in slots:
        host.release(slot)
    assert host.counts()["FREE"] == L.RING_N


def test_owner_transitions_refuse_the_wrong_state() -> None:
    host, gpu = _ring()
    slot = gpu.admit(b"x")
    with pytest.raises(RingStateError):
        host.release(slot)  # PARAM_READY is not CONSUMED
    with pytest.raises(RingStateError):
        host.complete(slot, tokens=1, batch_size=1, inference_us=1, sample=[0, 0, 0])
    host.pop_requests()
    host.take(slot)
    with pytest.raises(RingStateError):
        host.take(slot)
    assert not gpu.move(slot, L.S_RESULT_READY, L.S_CONSUMED)  # the GPU's CAS fails and is counted
    assert host.counts()["errors"] == 1


def test_full_ring_refuses_then_recovers_after_abort() -> None:
    host, gpu = _ring()
    slots = [gpu.admit(b"a", tag=i) for i in range(L.RING_N)]
    assert sorted(slots) == list(range(L.RING_N))
    assert gpu.admit(b"b") == -2 and host.counts()["full"] == 1
    taken = host.pop_requests()
    assert sorted(taken) == list(range(L.RING_N)) and host.pop_requests() == []
    host.take(taken[0])
    host.abort(taken[0])  # error path: PROCESSING -> FREE
    assert gpu.admit(b"c") == taken[0]


def test_queues_survive_many_laps_in_order() -> None:
    host, gpu = _ring()
    order = []
    for i in range(10 * L.RING_N + 3):  # positions wrap the 128 cells many times
        slot = gpu.admit(b"%d" % i, tag=i)
        (got,) = host.pop_requests()
        assert got == slot
        assert host.take(slot) == b"%d" % i
        host.complete(slot, tokens=i, batch_size=1, inference_us=1, sample=[0, 0, 0])
        assert gpu.build_one() == slot
        order.append(int(host.v.param[slot, L.J_TOKENS]))
        host.release(slot)
    assert order == list(range(10 * L.RING_N + 3))
    assert int(host.v.hdr[L.RH_REQ_HEAD]) == 10 * L.RING_N + 3


@pytest.mark.timeout(60)
def test_concurrent_gpu_threads_and_cpu_owner_conserve_slots() -> None:
    host, gpu = _ring()
    producers, per, consumers = 4, 200, 3
    total = producers * per
    consumed: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def produce(t: int) -> None:
        k = 0
        while k < per and not stop.is_set():
            if gpu.admit(b"p", tag=t * per + k) >= 0:
                k += 1
            else:
                time.sleep(0.0001)  # ring full: let the owner thread have the GIL

    def consume() -> None:
        while not stop.is_set():
            slot = gpu.build_one()
            if slot is not None:
                with lock:
                    consumed.append(slot)
            else:
                time.sleep(0.0001)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(producers)]
    threads += [threading.Thread(target=consume) for _ in range(consumers)]
    for th in threads:
        th.start()
    tags: list[int] = []
    released = 0
    try:
        while released < total:  # the CPU owner: take, complete, reclaim built slots
            for slot in host.pop_requests():
                host.take(slot)
                tags.append(int(host.v.param[slot, L.P_TAG]))
                host.complete(slot, tokens=1, batch_size=1, inference_us=1, sample=[0, 0, 0])
            with lock:
                done, consumed[:] = list(consumed), []
            for slot in done:
                host.release(slot)
                released += 1
    finally:
        stop.set()
        for th in threads:
            th.join(10)
    assert sorted(tags) == list(range(total))  # every request seen exactly once
    counts = host.counts()
    assert counts["FREE"] == L.RING_N and counts["errors"] == 0
