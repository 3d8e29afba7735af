"""The GAZSI ring between the GPU stages and the CPU batcher: the CPU half.

The ring is one buffer (``_layout.RING_BYTES``): on a GPU node mapped pinned host memory
(``cudaHostAlloc`` mapped, see :class:`~edge_node.transports.gpu.control.MappedBuffer`), in unit
tests a plain numpy array with the same layout, its GPU half emulated in Python
(``tests/support/gpu_ring.py``). Slots go FREE → PARAM_READY → PROCESSING →
RESULT_READY → CONSUMED → FREE; index queues are bounded Vyukov queues (see ``ring.cu``).

Division of labour (why the CPU needs no atomic read-modify-write): the CPU is the only
producer of the free and response queues and the only consumer of the request queue, and it
only changes a slot's state while it owns the slot (PARAM_READY, PROCESSING, CONSUMED). The GPU
(many threads) claims with system-scope CAS. On the CPU a value is stored before the sequence
word that publishes it; x86 keeps stores in order, and loads are not reordered with loads.

T0..T8 per slot (u64 ns): T0 head complete (CPU), T1 burst launched (CPU), T2 PARAM_READY (GPU
``%globaltimer``), T3 taken by the CPU, T4/T5 inference start/end (batch marks), T6 built (GPU
clock), T7 written to the socket, T8 FREE again. CPU marks use ``time.perf_counter_ns``; the two
GPU marks are another clock, so stage durations are taken within one clock only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from gazsi_cluster.errors import GazsiError

from . import _layout as L

__all__ = ["HostRing", "RingStateError", "RingView"]

_U32 = 0xFFFFFFFF


class RingStateError(GazsiError):
    """A slot was found in a state its owner did not expect: a bug, never a client's fault."""


class RingView:
    """numpy views of every ring field over ``buf`` (uint8, ``RING_BYTES`` long)."""

    def __init__(self, buf: np.ndarray) -> None:
        if buf.dtype != np.uint8 or buf.size < L.RING_BYTES:
            raise ValueError(f"ring buffer must be uint8 of at least {L.RING_BYTES} bytes")
        n = L.RING_N
        self.buf = buf
        self.hdr = buf[0:64].view(np.uint32)
        self.qseq = buf[L.RO_QSEQ:L.RO_QVAL].view(np.uint32).reshape(3, n)
        self.qval = buf[L.RO_QVAL:L.RO_STATE].view(np.uint32).reshape(3, n)
        self.state = buf[L.RO_STATE:L.RO_PARAM].view(np.uint32)
        self.param = buf[L.RO_PARAM:L.RO_SAMPLE].view(np.int32).reshape(n, L.P_NFIELDS)
        self.sample = buf[L.RO_SAMPLE:L.RO_TS].view(np.float32).reshape(n, 4)
        self.ts = buf[L.RO_TS:L.RO_OUTLEN].view(np.uint64).reshape(n, 9)
        self.out_len = buf[L.RO_OUTLEN:L.RO_D].view(np.int32)
        self.d = buf[L.RO_D:L.RO_OUT].reshape(n, L.D_MAX)
        self.out = buf[L.RO_OUT:L.RING_BYTES].reshape(n, L.RING_OUT)


class HostRing:
    """The CPU side. Not thread-safe by design: one thread (the event loop) owns it."""

    def __init__(self, buf: np.ndarray) -> None:
        self.v = RingView(buf)
        self.reset()

    def reset(self) -> None:
        """All slots FREE and queued on the free queue; counters zero (no GPU work may be in flight)."""
        v = self.v
        v.buf[: L.RO_D] = 0
        for q in range(3):
            v.qseq[q, :] = np.arange(L.RING_N, dtype=np.uint32)  # cell i expects position i
        for slot in range(L.RING_N):
            self.push(L.Q_FREE, slot)

    # -- queues ---------------------------------------------------------------------------
    def push(self, q: int, value: int) -> None:
        """Single-producer push (free or response queue). Never full: each slot is in one queue."""
        v = self.v
        pos = int(v.hdr[2 * q + 1])
        cell = pos & (L.RING_N - 1)
        deadline = 0.0
        while int(v.qseq[q, cell]) != pos:
            # A GPU consumer may have claimed this cell's previous lap (CAS on head) without yet
            # handing it back (its sequence store): that takes nanoseconds. Anything longer is a bug.
            now = time.perf_counter()
            deadline = deadline or now + 0.01
            if now > deadline:
                raise RingStateError(f"queue {q} full at position {pos}")
        v.qval[q, cell] = value
        v.qseq[q, cell] = (pos + 1) & _U32  # publishes the value (stored after it)
        v.hdr[2 * q + 1] = (pos + 1) & _U32

    def pop(self, q: int) -> int | None:
        """Single-consumer pop (request queue): the slot, or None when empty."""
        v = self.v
        pos = int(v.hdr[2 * q])
        cell = pos & (L.RING_N - 1)
        if int(v.qseq[q, cell]) != (pos + 1) & _U32:
            return None
        value = int(v.qval[q, cell])
        v.qseq[q, cell] = (pos + L.RING_N) & _U32  # hands the cell back to producers
        v.hdr[2 * q] = (pos + 1) & _U32
        return value & (L.RING_N - 1)

    def free_count(self) -> int:
        """Slots on the free queue. Exact between launches (the admit kernel is the only consumer)."""
        hdr = self.v.hdr
        return (int(hdr[2 * L.Q_FREE + 1]) - int(hdr[2 * L.Q_FREE])) & _U32

    def pop_requests(self) -> list[int]:
        out = []
        while (slot := self.pop(L.Q_REQUEST)) is not None:
            out.append(slot)
        return out

    # -- slot states ----------------------------------------------------------------------
    def _move(self, slot: int, frm: int, to: int) -> None:
        cur = int(self.v.state[slot])
        if cur != frm:
            raise RingStateError(
                f"slot {slot} is {L.STATE_NAMES[cur] if cur < 5 else cur}, expected {L.STATE_NAMES[frm]}")
        self.v.state[slot] = to

    def stamp(self, slot: int, mark: int, ns: int | None = None) -> None:
        self.v.ts[slot, mark] = time.perf_counter_ns() if ns is None else ns

    def take(self, slot: int) -> bytes:
        """PARAM_READY → PROCESSING; returns the decoded ``d`` bytes."""
        self._move(slot, L.S_PARAM_READY, L.S_PROCESSING)
        self.stamp(slot, 3)
        n = int(self.v.param[slot, L.J_DLEN])
        return self.v.d[slot, :n].tobytes()

    def complete(self, slot: int, *, tokens: int, batch_size: int, inference_us: int, sample: Sequence[float],
                 infer_marks: tuple[float, float] = (0.0, 0.0)) -> None:
        """Write the result, PROCESSING → RESULT_READY, and queue the slot for the builder."""
        self.complete_many([slot], tokens=[tokens], batch_sizes=[batch_size], inference_us=[inference_us],
                           samples=np.asarray([sample[:3]], dtype=np.float32), infer_marks=[infer_marks])

    def complete_many(self, slots: Sequence[int], *, tokens: Sequence[int], batch_sizes: Sequence[int],
                      inference_us: Sequence[int], samples: np.ndarray, infer_marks: Sequence[tuple[float, float]]
                      ) -> None:
        """:meth:`complete` for a burst's slots: each field written once for all of them (numpy), then the states
        that publish them, then the response queue. ``samples`` is (len(slots), 3) float32."""
        v = self.v
        idx = np.asarray(slots, dtype=np.intp)
        wrong = idx[v.state[idx] != L.S_PROCESSING]
        if wrong.size:
            cur = int(v.state[wrong[0]])
            raise RingStateError(f"slot {int(wrong[0])} is {L.STATE_NAMES[cur] if cur < 5 else cur}, "
                                 f"expected {L.STATE_NAMES[L.S_PROCESSING]}")
        v.param[idx, L.J_TOKENS] = tokens
        v.param[idx, L.J_BATCH] = batch_sizes
        v.param[idx, L.J_INFER_US] = np.minimum(np.asarray(inference_us, dtype=np.int64), 2**31 - 1)
        v.sample[idx, :3] = samples
        self.stamp_inference(idx, infer_marks)
        v.state[idx] = L.S_RESULT_READY  # after the results: the states publish them (x86 keeps stores in order)
        for slot in slots:
            self.push(L.Q_RESPONSE, slot)

    def stamp_inference(self, slots: Sequence[int] | np.ndarray, infer_marks: Sequence[tuple[float, float]]) -> None:
        """T4 and T5 of ``slots``: each one's inference start and end (``perf_counter`` seconds)."""
        marks = np.asarray(infer_marks, dtype=np.float64).reshape(len(slots), 2)
        self.v.ts[np.asarray(slots, dtype=np.intp), 4:6] = (marks * 1e9).astype(np.uint64)

    def abort(self, slot: int) -> None:
        """PROCESSING → FREE: the request failed on the CPU and was answered there."""
        self._move(slot, L.S_PROCESSING, L.S_FREE)
        self.stamp(slot, 8)
        self.push(L.Q_FREE, slot)

    def response(self, slot: int) -> bytes:
        """The built HTTP response of a CONSUMED slot."""
        if int(self.v.state[slot]) != L.S_CONSUMED:
            raise RingStateError(f"slot {slot} has no built response")
        return self.v.out[slot, : int(self.v.out_len[slot])].tobytes()

    def release(self, slot: int) -> None:
        """CONSUMED → FREE once the response is on its way."""
        self._move(slot, L.S_CONSUMED, L.S_FREE)
        self.stamp(slot, 8)
        self.push(L.Q_FREE, slot)

    def counts(self) -> dict[str, int]:
        states = np.bincount(self.v.state.astype(np.int64), minlength=5)
        out = {name: int(states[i]) for i, name in enumerate(L.STATE_NAMES)}
        out["errors"], out["full"] = int(self.v.hdr[L.RH_ERRORS]), int(self.v.hdr[L.RH_FULL])
        return out
