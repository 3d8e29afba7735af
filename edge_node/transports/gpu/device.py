"""The device half of the GPU data plane: what :class:`~edge_node.transports.gpu.server.GpuDataplane` asks of the GPU.

:class:`HttpDevice` is the seam: parse a burst of heads and admit the hot ``/inference`` ones into the
ring (``gz_parse`` + ``gz_ring_admit``), build canned answers (``gz_build``), build the ring's finished
results (``gz_ring_build``). :class:`CudaDevice` runs the CUDA kernels (CuPy, imported here on first
use, never at module import). The tests drive the same data plane with a CPU reference of these kernels
(``tests/support/gpu_plane.py``); the kernels are held to that reference on a GPU (``tests/gpu``).

The two hot calls are launched, not waited for (:class:`Launched`): the kernels and the copy of their
results into pinned host memory go on a stream, and a CUDA event with blocking sync says when they are
done. The data plane waits for that event off its event loop, so the loop keeps framing heads (the next
burst grows meanwhile) and writing answers while the GPU works, and no CPU spins on the wait. They used to
synchronise in the loop (``.get()``): on the H100 (2026-12-06, MPS) a feed then launched bursts of ~5
heads and its answers waited 1.5 ms for the build loop's turn.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from . import _layout as L
from .control import MappedBuffer
from .ring import HostRing

__all__ = ["SCHEDULE_FLAGS", "CudaDevice", "HttpDevice", "Launched", "ring_module", "set_schedule"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Event(Protocol):
    @property
    def done(self) -> bool: ...

    def synchronize(self) -> None: ...


class Launched(Generic[T]):
    """Work launched on the device: :meth:`done` polls, :meth:`wait` blocks (the GIL released, so from a
    thread), :meth:`result` reads what it produced once done. Without an event it is done at once (the
    kernels' CPU reference computes while launching)."""

    __slots__ = ("_event", "_read")

    def __init__(self, read: Callable[[], T], event: _Event | None = None) -> None:
        self._read = read
        self._event = event

    def done(self) -> bool:
        return self._event is None or self._event.done

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> T:
        return self._read()


class HttpDevice(Protocol):
    """The kernels' side of the data plane, driven by one thread (the event loop).

    At most one :meth:`launch_parse_admit` and one :meth:`launch_build_ring` are in flight at a time
    (each reuses its buffers); the two may overlap: the ring's queues are lock-free between them.
    """

    ring: HostRing

    def launch_parse_admit(self, heads: Sequence[bytes]) -> Launched[np.ndarray]:
        """Parse ``heads``; each valid ``/inference`` takes a ring slot. Result: rows (int32, NFIELDS each)."""

    def build_canned(self, jobs: np.ndarray) -> list[bytes]:
        """Whole responses for canned jobs (``kernels.jobs_for``); synchronous (pages are not the hot path)."""

    def launch_build_ring(self, n: int) -> Launched[list[int]]:
        """Build ``n`` queued results into their slots' responses. Result: the slots built (-1: none found)."""

    def close(self) -> None:
        """Wait for the device and free what it holds (no kernel may touch the ring afterwards)."""


@functools.lru_cache(maxsize=1)
def ring_module() -> Any:
    """``http_kernels.cu`` with ``ring.cu`` appended, compiled once (CuPy)."""
    import cupy as cp

    pkg = resources.files(__package__)
    src = pkg.joinpath("http_kernels.cu").read_text() + "\n" + pkg.joinpath("ring.cu").read_text()
    return cp.RawModule(code=src, options=("--std=c++17",))


# CU_CTX_SCHED_AUTO / SPIN / YIELD / BLOCKING_SYNC (driver API; the runtime's cudaDeviceSchedule* are equal).
SCHEDULE_FLAGS = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}


def set_schedule(sync: str, device: int = 0) -> None:
    """How this process's CPU waits for the GPU (``edge.gpu_sync``), set on the device's primary context.

    Through the driver API (``cuDevicePrimaryCtxSetFlags``), which CuPy's runtime calls then use: CuPy has no
    ``cudaSetDeviceFlags`` (the H100, 2026-12-06: every feed process of ``gpu_sync: blocking`` died with an
    AttributeError, and the node waited 120 s for them). A driver that refuses is logged; the node goes on.
    """
    if sync == "auto":
        return
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        rc = cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), device) or \
            cuda.cuDevicePrimaryCtxSetFlags_v2(dev, SCHEDULE_FLAGS[sync])
    except (OSError, AttributeError) as exc:
        log.warning("edge.gpu_sync=%s not applied: %r", sync, exc)
        return
    if rc:
        log.warning("edge.gpu_sync=%s not applied: CUDA driver error %d", sync, rc)


def open_stream(priority: str = "default") -> tuple[Any, Callable[[], None]]:
    """A non-blocking stream for the plane's bursts or builds, and how to free it (``edge.gpu_stream_priority``).

    ``high``: at the context's greatest priority, so a burst's few small kernels are scheduled before the
    blocks of the model's next kernel (the engine's streams have the default priority). CuPy's ``Stream``
    takes no priority, so the driver makes it (``cuStreamCreateWithPriority``, cuda-bindings) and CuPy wraps
    it; where either refuses, the node logs why and uses a default-priority stream.
    """
    import cupy as cp

    if priority == "high":
        try:
            from cuda.bindings import driver as cu

            err, _, greatest = cu.cuCtxGetStreamPriorityRange()
            if err == cu.CUresult.CUDA_SUCCESS:
                err, handle = cu.cuStreamCreateWithPriority(cu.CUstream_flags.CU_STREAM_NON_BLOCKING, greatest)
            if err != cu.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"CUDA driver error {err}")
            return cp.cuda.ExternalStream(int(handle)), lambda: cu.cuStreamDestroy(handle)
        except Exception as exc:  # an old driver or binding: the plane still serves
            log.warning("edge.gpu_stream_priority=high not applied (%s): default-priority streams", exc)
    return cp.cuda.Stream(non_blocking=True), lambda: None


def cuda_device(sync: str = "auto", priority: str = "default", zero_copy: bool = False) -> Callable[[int], HttpDevice]:
    """The CUDA kernels' device factory, waiting for the GPU as ``edge.gpu_sync`` says, its streams at
    ``edge.gpu_stream_priority``, copying a burst's heads and rows or not (``edge.gpu_zero_copy``)."""
    def make(capacity: int) -> HttpDevice:
        return CudaDevice(capacity, sync=sync, priority=priority, zero_copy=zero_copy)

    return make


class CudaDevice:
    """GPU buffers, the mapped ring and the kernels for bursts of up to ``capacity`` heads.

    ``sync``: :func:`set_schedule` first (``edge.gpu_sync``); ``priority``: :func:`open_stream`'s.
    ``zero_copy`` (``edge.gpu_zero_copy``): a burst is two kernels and an event, where it was two uploads, two
    kernels, a download and an event: the parse kernel reads the heads from mapped pinned host memory (where a
    GPUNetIO queue would leave packets) and the admit kernel writes the rows there too. On the H100 neither
    way was faster beyond the noise between runs (docs/gpunetio.md), so copies stay the default.
    """

    def __init__(self, capacity: int = 1024, *, sync: str = "auto", priority: str = "default",
                 zero_copy: bool = False) -> None:
        import cupy as cp

        set_schedule(sync, cp.cuda.runtime.getDevice())

        from .kernels import GpuHttpEngine

        self.engine = GpuHttpEngine(capacity, mapped=zero_copy)
        self.ring_mem = MappedBuffer(L.RING_BYTES)
        self.ring = HostRing(self.ring_mem.array)
        self.d_ring = self.ring_mem.device_array(cp.uint8, (L.RING_BYTES,))
        mod = ring_module()
        self.k_admit = mod.get_function("gz_ring_admit")
        self.k_build = mod.get_function("gz_ring_build")
        self.d_built = cp.full(L.RING_N, -1, dtype=cp.int32)
        # Bursts and builds each on a stream of their own (neither waits behind the other), an event after
        # each. With gpu_sync auto or blocking the event has blocking sync: the waiter thread sleeps until the
        # GPU's interrupt wakes it. With spin or yield it waits as the context does (spinning, or yielding its
        # core), the GIL released: a CPU for a wake-up that does not go through an interrupt.
        self.parse_stream, free_parse = open_stream(priority)
        self.build_stream, free_build = open_stream(priority)
        self._free_streams = (free_parse, free_build)
        block = sync in ("auto", "blocking")
        self.parse_done = cp.cuda.Event(block=block, disable_timing=True)
        self.build_done = cp.cuda.Event(block=block, disable_timing=True)
        self._rows_out: Any = np.uintp(0)  # gz_ring_admit's rows_out: none, the rows are copied down
        self._mapped_rows: MappedBuffer | None = None
        if zero_copy:
            self._mapped_rows = MappedBuffer(capacity * L.NFIELDS * 4, np.int32)
            self.h_rows = self._mapped_rows.array.reshape(capacity, L.NFIELDS)
            self._rows_out = np.uintp(self._mapped_rows.dev_ptr)
        else:
            self._h_rows_mem = cp.cuda.alloc_pinned_memory(capacity * L.NFIELDS * 4)
            self.h_rows = np.frombuffer(self._h_rows_mem, dtype=np.int32, count=capacity * L.NFIELDS).reshape(
                capacity, L.NFIELDS)
        self._h_built_mem = cp.cuda.alloc_pinned_memory(L.RING_N * 4)
        self.h_built = np.frombuffer(self._h_built_mem, dtype=np.int32, count=L.RING_N)

    def _to_host(self, dst: np.ndarray, src: Any, stream: Any) -> None:
        import cupy as cp

        rt = cp.cuda.runtime
        rt.memcpyAsync(dst.ctypes.data, src.data.ptr, dst.nbytes, rt.memcpyDeviceToHost, stream.ptr)

    def launch_parse_admit(self, heads: Sequence[bytes]) -> Launched[np.ndarray]:
        eng, stream = self.engine, self.parse_stream
        n = eng.load(heads)
        eng.upload(n, stream)
        eng.launch_parse(n, stream)
        self.k_admit(((n + 127) // 128,), (128,), (eng.d_results, eng.d_dbuf, np.int32(n), self.d_ring,
                                                   self._rows_out), stream=stream)
        if self._mapped_rows is None:
            self._to_host(self.h_rows[:n], eng.d_results[:n], stream)
        self.parse_done.record(stream)
        return Launched(lambda: self.h_rows[:n].copy(), self.parse_done)

    def build_canned(self, jobs: np.ndarray) -> list[bytes]:
        return self.engine.build(jobs, np.zeros((len(jobs), 3), dtype=np.float32))

    def launch_build_ring(self, n: int) -> Launched[list[int]]:
        eng, stream = self.engine, self.build_stream
        self.k_build(((n + 127) // 128,), (128,), (np.int32(n), self.d_ring, eng.d_canned, eng.d_canned_idx,
                                                     self.d_built), stream=stream)
        self._to_host(self.h_built[:n], self.d_built[:n], stream)
        self.build_done.record(stream)
        return Launched(lambda: self.h_built[:n].tolist(), self.build_done)

    def close(self) -> None:
        import cupy as cp

        cp.cuda.Device().synchronize()  # no kernel may touch the ring once it is freed
        self.ring_mem.free()
        self.engine.free()
        if self._mapped_rows is not None:
            self._mapped_rows.free()
        for free in self._free_streams:
            free()
