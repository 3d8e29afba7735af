"""A CPU emulation of the GPU half of ``ring.cu``, for unit tests on machines without a GPU.

A test double: it lives here, not in the installed ``edge_node.transports.gpu`` package.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu.ring import RingView

__all__ = ["EmulatedGpuSide"]

_U32 = 0xFFFFFFFF


class EmulatedGpuSide:
    """The GPU half of ``ring.cu`` in Python, same algorithm, a lock standing in for each CAS.

    Lets unit tests drive the state machine and the queues with concurrent "GPU" threads on a
    machine without a GPU. Several threads may call it at once (as warps would).
    """

    def __init__(self, view: RingView) -> None:
        self.v = view
        self._cas_lock = threading.Lock()

    def _cas(self, arr: np.ndarray, idx: int, expect: int, new: int) -> bool:
        with self._cas_lock:
            if int(arr[idx]) != expect:
                return False
            arr[idx] = new
            return True

    def push(self, q: int, value: int, spin: int = 100_000) -> int:
        v = self.v
        for _ in range(spin):
            pos = int(v.hdr[2 * q + 1])
            cell = pos & (L.RING_N - 1)
            dif = (int(v.qseq[q, cell]) - pos + 2**31) % 2**32 - 2**31
            if dif == 0:
                if self._cas(v.hdr, 2 * q + 1, pos, (pos + 1) & _U32):
                    v.qval[q, cell] = value
                    v.qseq[q, cell] = (pos + 1) & _U32
                    return 1
            elif dif < 0:
                return 0
        return -1

    def pop(self, q: int, spin: int = 100_000) -> int | None:
        v = self.v
        for _ in range(spin):
            pos = int(v.hdr[2 * q])
            cell = pos & (L.RING_N - 1)
            dif = (int(v.qseq[q, cell]) - (pos + 1) + 2**31) % 2**32 - 2**31
            if dif == 0:
                if self._cas(v.hdr, 2 * q, pos, (pos + 1) & _U32):
                    value = int(v.qval[q, cell])
                    v.qseq[q, cell] = (pos + L.RING_N) & _U32
                    return value & (L.RING_N - 1)
            elif dif < 0:
                return None
        return None

    def move(self, slot: int, frm: int, to: int) -> bool:
        if self._cas(self.v.state, slot, frm, to):
            return True
        with self._cas_lock:
            self.v.hdr[L.RH_ERRORS] += 1
        return False

    def admit(self, d: bytes, *, keep_alive: bool = True, head_only: bool = False, tag: int = 0) -> int:
        """``gz_ring_admit`` for one request: the slot, or -2 when none is free (-3: a queue misbehaved)."""
        slot = self.pop(L.Q_FREE)
        if slot is None:
            with self._cas_lock:
                self.v.hdr[L.RH_FULL] += 1
            return -2
        self.v.d[slot, : len(d)] = np.frombuffer(d, dtype=np.uint8)
        p = self.v.param[slot]
        p[:] = 0
        p[L.J_KIND], p[L.J_KEEPALIVE], p[L.J_HEADONLY], p[L.J_DLEN], p[L.P_TAG] = 1, int(keep_alive), int(head_only), len(d), tag
        self.v.ts[slot, 2] = time.perf_counter_ns()
        if not self.move(slot, L.S_FREE, L.S_PARAM_READY) or self.push(L.Q_REQUEST, slot) != 1:
            return -3
        return slot

    def build_one(self) -> int | None:
        """``gz_ring_build`` for one thread: pop a response, RESULT_READY → CONSUMED, write a marker body."""
        slot = self.pop(L.Q_RESPONSE)
        if slot is None or not self.move(slot, L.S_RESULT_READY, L.S_CONSUMED):
            return None
        body = b"tokens=%d" % int(self.v.param[slot, L.J_TOKENS])
        self.v.out[slot, : len(body)] = np.frombuffer(body, dtype=np.uint8)
        self.v.out_len[slot] = len(body)
        self.v.ts[slot, 6] = time.perf_counter_ns()
        return slot
