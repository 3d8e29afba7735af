"""The shared-memory ring between the fast front's HTTP workers and the node process that owns the engine.

One ``multiprocessing.shared_memory`` block holds a small header and fixed slots. Worker ``w``
owns slots ``[w*S, (w+1)*S)`` outright, so no cross-process allocation lock exists: a worker
fills free slots, then writes their indices (4 bytes each, one write per loop turn, atomic below
PIPE_BUF) into the engine's request pipe; the engine writes results into the same slot and the index
back into that worker's response pipe. Pipes are the wakeup (the reader sleeps in epoll, no spinning) and carry only
indices; token ids and vectors never leave shared memory. Each worker also keeps its request metrics
(:class:`edge_node.metrics.RequestMetrics` cells) in a stats block of its own here, which the node sums
at scrape time.

A slot carries the generation of the engine it was sent to, so a batcher never serves an index left in
the pipe for an earlier one.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from edge_node.metrics import RequestMetrics

__all__ = [
    "DOWN_MARKER",
    "ENGINE_DOWN",
    "ENGINE_DRAINING",
    "ENGINE_FAILED",
    "ENGINE_LOADING",
    "ENGINE_UP",
    "M_T_FORMED",
    "M_T_INFER0",
    "M_T_INFER1",
    "M_T_READ",
    "M_T_REPLY",
    "M_T_SUBMIT",
    "M_T_WOKEN",
    "RingLayout",
    "SlotRing",
    "attach_shared_memory",
    "pack_indices",
    "unpack_indices",
]

ENGINE_LOADING, ENGINE_UP, ENGINE_DOWN, ENGINE_FAILED, ENGINE_DRAINING = 0, 1, 2, 3, 4
# Written by the node into every response pipe when its engine stops: fail everything in flight.
DOWN_MARKER = 0xFFFFFFFF

# Header words (int64): state, generation, engine pid, created (unix s), workers, slots per worker.
_H_STATE, _H_GEN, _H_PID, _H_CREATED = 0, 1, 2, 3
_HEADER_WORDS = 16
# Slot meta words (int64).
M_GEN, M_INPUTS, M_TOKENS, M_STATUS, M_BATCH, M_INFER_US, M_CACHE, M_RETRY_MS = range(8)
# Per-stage timestamps (time.monotonic_ns, one clock for every process on the host), written by
# whoever owns the slot at that stage: worker submit -> engine read -> batch formed -> inference
# start/end -> reply written -> worker woken. benchmarks/fast_stages.py reads them (issue 8, round 2).
M_T_SUBMIT, M_T_READ, M_T_FORMED, M_T_INFER0, M_T_INFER1, M_T_REPLY, M_T_WOKEN = range(8, 15)
_META_WORDS = 16
_MSG_BYTES = 512  # error message + class name of a failed slot

CACHE_NAMES = {0: None, 1: "hit", 2: "miss", 3: "partial"}
CACHE_CODES = {v: k for k, v in CACHE_NAMES.items()}

_IDX = struct.Struct("<I")


def pack_indices(indices: list[int]) -> bytes:
    return b"".join(_IDX.pack(i) for i in indices)


def unpack_indices(data: bytes) -> list[int]:
    """Indices from a pipe read; reads return whole 4-byte writes (atomic, so never split)."""
    return [v for (v,) in _IDX.iter_unpack(data[: len(data) - len(data) % 4])]


def attach_shared_memory(name: str) -> shared_memory.SharedMemory:
    """Attach to a block another process owns, without this process's resource tracker claiming it.

    Workers are separate interpreters with trackers of their own; before Python 3.13 attaching
    registers the block there, and the tracker unlinks it when the worker exits -- taking the ring
    away from the node and every other worker. Only the creator unlinks.
    """
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        from multiprocessing import resource_tracker

        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return shm


@dataclass(frozen=True, slots=True)
class RingLayout:
    workers: int
    slots_per_worker: int
    slot_inputs: int
    slot_tokens: int
    dimensions: int

    @property
    def slots(self) -> int:
        return self.workers * self.slots_per_worker

    def offsets(self) -> dict[str, tuple[int, int]]:
        """(offset, nbytes) of each array, each 64-byte aligned."""
        n = self.slots
        sizes = {
            "header": _HEADER_WORDS * 8,
            "meta": n * _META_WORDS * 8,
            "deadline": n * 8,
            "msg": n * _MSG_BYTES,
            "lengths": n * self.slot_inputs * 4,
            "tokens": n * self.slot_tokens * 4,
            "vectors": n * self.slot_inputs * self.dimensions * 4,
            "stats": self.workers * self.stats_stride,
        }
        out, pos = {}, 0
        for name, size in sizes.items():
            out[name] = (pos, size)
            pos += (size + 63) // 64 * 64
        return out

    @property
    def stats_stride(self) -> int:
        """Bytes of one worker's stats block (64-byte aligned)."""
        return (RequestMetrics.NBYTES + 63) // 64 * 64

    @property
    def nbytes(self) -> int:
        off, size = self.offsets()["stats"]
        return off + size

    def worker_of(self, slot: int) -> int:
        return slot // self.slots_per_worker


class SlotRing:
    """Typed numpy views over the shared block. ``create`` in the supervisor, ``attach`` elsewhere."""

    def __init__(self, layout: RingLayout, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.layout, self.shm, self._owner = layout, shm, owner
        buf = shm.buf
        assert buf is not None
        off = layout.offsets()
        n, k, t, d = layout.slots, layout.slot_inputs, layout.slot_tokens, layout.dimensions

        def view(name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
            o, _size = off[name]
            return np.ndarray(shape, dtype=dtype, buffer=buf, offset=o)

        self.header = view("header", np.int64, (_HEADER_WORDS,))
        self.meta = view("meta", np.int64, (n, _META_WORDS))
        self.deadline = view("deadline", np.float64, (n,))
        self.msg = view("msg", np.uint8, (n, _MSG_BYTES))
        self.lengths = view("lengths", np.int32, (n, k))
        self.tokens = view("tokens", np.int32, (n, t))
        self.vectors = view("vectors", np.float32, (n, k, d))
        self._stats_offset = off["stats"][0]
        self._metrics: list[RequestMetrics] = []

    @classmethod
    def create(cls, layout: RingLayout) -> SlotRing:
        shm = shared_memory.SharedMemory(create=True, size=layout.nbytes)
        ring = cls(layout, shm, owner=True)
        ring.header[:] = 0
        return ring

    @classmethod
    def attach(cls, layout: RingLayout, name: str) -> SlotRing:
        return cls(layout, attach_shared_memory(name), owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    def worker_metrics(self, worker: int) -> RequestMetrics:
        """Worker ``worker``'s request metrics, in this block (the worker writes them, the node sums them)."""
        buf = self.shm.buf
        assert buf is not None
        o = self._stats_offset + worker * self.layout.stats_stride
        metrics = RequestMetrics(buf[o:o + RequestMetrics.NBYTES])
        self._metrics.append(metrics)
        return metrics

    def close(self) -> None:
        # Drop the numpy views and metrics cells first: an exported buffer cannot be closed.
        for metrics in self._metrics:
            metrics.release()
        self._metrics.clear()
        for attr in ("header", "meta", "deadline", "msg", "lengths", "tokens", "vectors"):
            setattr(self, attr, None)
        with contextlib.suppress(BufferError):  # a caller still holds a view; the mapping goes with the process
            self.shm.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()

    # -- header ---------------------------------------------------------------------------
    @property
    def state(self) -> int:
        return int(self.header[_H_STATE])

    @property
    def generation(self) -> int:
        return int(self.header[_H_GEN])

    def set_state(self, state: int, *, generation: int | None = None, pid: int | None = None) -> None:
        if generation is not None:
            self.header[_H_GEN] = generation
        if pid is not None:
            self.header[_H_PID] = pid
        self.header[_H_STATE] = state

    @property
    def created(self) -> int:
        return int(self.header[_H_CREATED])

    def set_created(self, created: int) -> None:
        self.header[_H_CREATED] = created

    # -- slots ----------------------------------------------------------------------------
    def write_request(self, slot: int, seqs: list[np.ndarray], deadline: float) -> None:
        """Copy one chunk's token arrays into ``slot`` (caller checked it fits)."""
        meta = self.meta[slot]
        total = 0
        lengths = self.lengths[slot]
        tokens = self.tokens[slot]
        for i, seq in enumerate(seqs):
            n = len(seq)
            lengths[i] = n
            tokens[total:total + n] = seq
            total += n
        meta[M_GEN] = self.generation
        meta[M_INPUTS] = len(seqs)
        meta[M_TOKENS] = total
        meta[M_STATUS] = 0
        self.deadline[slot] = deadline

    def read_request(self, slot: int) -> list[np.ndarray]:
        """The chunk's token arrays, as int64 copies (the batcher keeps them past the slot's life)."""
        meta = self.meta[slot]
        n, total = int(meta[M_INPUTS]), int(meta[M_TOKENS])
        flat = self.tokens[slot, :total].astype(np.int64)
        if n == 1:  # the common case; numpy's split/cumsum cost more than the copy (py-spy, H100)
            return [flat]
        ends = np.cumsum(self.lengths[slot, :n])
        return list(np.split(flat, ends[:-1]))

    def write_result(self, slot: int, vectors: np.ndarray, batch_size: int, inference_us: int, cache: str | None) -> None:
        meta = self.meta[slot]
        self.vectors[slot, : vectors.shape[0]] = vectors
        meta[M_BATCH] = batch_size
        meta[M_INFER_US] = inference_us
        meta[M_CACHE] = CACHE_CODES.get(cache, 0)
        meta[M_STATUS] = 1

    def write_error(self, slot: int, kind: str, message: str, param: str | None, retry_after: float) -> None:
        """A failed slot: class name, param and message travel as ``kind\\0param\\0message``."""
        raw = f"{kind}\0{param or ''}\0{message}".encode()[: _MSG_BYTES - 2]
        self.msg[slot, :2] = np.frombuffer(len(raw).to_bytes(2, "little"), dtype=np.uint8)
        self.msg[slot, 2 : 2 + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.meta[slot, M_RETRY_MS] = int(retry_after * 1000)
        self.meta[slot, M_STATUS] = 2

    def read_error(self, slot: int) -> tuple[str, str | None, str, float]:
        n = int.from_bytes(bytes(self.msg[slot, :2]), "little")
        raw = bytes(self.msg[slot, 2 : 2 + n])
        kind, param, message = ([*raw.decode(errors="replace").split("\x00", 2), "", ""])[:3]
        return kind, (param or None), message, self.meta[slot, M_RETRY_MS] / 1000.0
