"""The device half of the GPU data plane: what :class:`~edge_node.transports.gpu.server.GpuDataplane` asks of the GPU.

:class:`HttpDevice` is the seam: parse a burst of heads and admit the hot ``/inference`` ones into the
ring (``gz_parse`` + ``gz_ring_admit``), build canned answers (``gz_build``), build the ring's finished
results (``gz_ring_build``). :class:`CudaDevice` runs the CUDA kernels (CuPy, imported here on first
use, never at module import). The tests drive the same data plane with a CPU reference of these kernels
(``tests/support/gpu_plane.py``); the kernels are held to that reference on a GPU (``tests/gpu``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol

import numpy as np

from . import _layout as L
from .ring import HostRing

__all__ = ["SCHEDULE_FLAGS", "CudaDevice", "HttpDevice", "ring_module", "set_schedule"]

log = logging.getLogger(__name__)


class HttpDevice(Protocol):
    """The kernels' side of the data plane, driven by one thread (the event loop)."""

    ring: HostRing

    def parse_admit(self, heads: Sequence[bytes]) -> np.ndarray:
        """Parse ``heads``; each valid ``/inference`` takes a ring slot. The result rows (int32, NFIELDS each)."""

    def build_canned(self, jobs: np.ndarray) -> list[bytes]:
        """Whole responses for canned jobs (``kernels.jobs_for``)."""

    def build_ring(self, n: int) -> list[int]:
        """Build ``n`` queued results into their slots' responses; the slots built (-1: none found)."""

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


class CudaDevice:
    """GPU buffers, the mapped ring and the kernels for bursts of up to ``capacity`` heads.

    ``sync``: :func:`set_schedule` first (``edge.gpu_sync``).
    """

    def __init__(self, capacity: int = 1024, *, sync: str = "auto") -> None:
        import cupy as cp

        set_schedule(sync, cp.cuda.runtime.getDevice())

        from .control import MappedBuffer
        from .kernels import GpuHttpEngine

        self.engine = GpuHttpEngine(capacity)
        self.ring_mem = MappedBuffer(L.RING_BYTES)
        self.ring = HostRing(self.ring_mem.array)
        self.d_ring = self.ring_mem.device_array(cp.uint8, (L.RING_BYTES,))
        mod = ring_module()
        self.k_admit = mod.get_function("gz_ring_admit")
        self.k_build = mod.get_function("gz_ring_build")
        self.d_built = cp.full(L.RING_N, -1, dtype=cp.int32)

    def parse_admit(self, heads: Sequence[bytes]) -> np.ndarray:
        eng = self.engine
        n = eng.load(heads)
        eng.upload(n)
        eng.launch_parse(n)
        self.k_admit(((n + 127) // 128,), (128,), (eng.d_results, eng.d_dbuf, np.int32(n), self.d_ring))
        rows: np.ndarray = eng.d_results[:n].get()  # synchronises: parse and admission are done
        return rows

    def build_canned(self, jobs: np.ndarray) -> list[bytes]:
        return self.engine.build(jobs, np.zeros((len(jobs), 3), dtype=np.float32))

    def build_ring(self, n: int) -> list[int]:
        eng = self.engine
        self.k_build(((n + 127) // 128,), (128,), (np.int32(n), self.d_ring, eng.d_canned, eng.d_canned_idx,
                                                     self.d_built))
        built: list[int] = self.d_built[:n].get().tolist()
        return built

    def close(self) -> None:
        import cupy as cp

        cp.cuda.Device().synchronize()  # no kernel may touch the ring once it is freed
        self.ring_mem.free()
