"""Control-flow modes for running the parse kernel on bursts (NVIDIA's inline-processing write-up).

* ``launch`` (a): the CPU launches one kernel per burst and waits for it.
* ``persistent`` (b): one kernel stays resident and polls a doorbell in mapped host memory;
  it returns on the exit flag, or by itself after ``max_idle_s`` without work (never hangs the GPU).
* ``memops`` (c): the stream waits on the doorbell with ``cuStreamWaitValue32``, resets it with
  ``cuStreamWriteValue32`` and runs three kernels (the burst size into device memory, the parse, the done
  count); that sequence is captured once in a CUDA graph and ``depth`` launches are kept pre-posted, one
  re-posted after each burst.

All three read request bytes straight from the same mapped pinned receive buffer (zero-copy, as
GPUNetIO packets would already sit in GPU-visible memory) and write results to device memory.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from . import _layout as L
from .kernels import _module

__all__ = ["BurstRunner", "MappedBuffer", "make_runner"]

Mode = Literal["launch", "persistent", "memops"]
C_DOORBELL, C_N, C_EXIT, C_DONE, C_BLOCKS, C_ALIVE = range(6)


class MappedBuffer:
    """``cudaHostAlloc(..., cudaHostAllocMapped)`` memory: a numpy view and its device pointer."""

    def __init__(self, nbytes: int, dtype: Any = np.uint8) -> None:
        import cupy as cp

        rt = cp.cuda.runtime
        self.host_ptr = rt.hostAlloc(nbytes, rt.hostAllocMapped)
        from cuda.bindings import driver as cu

        err, dptr = cu.cuMemHostGetDevicePointer(self.host_ptr, 0)
        if err != cu.CUresult.CUDA_SUCCESS:
            rt.freeHost(self.host_ptr)
            raise RuntimeError(f"cuMemHostGetDevicePointer: {err}")
        self.dev_ptr = int(dptr)
        raw = (ctypes.c_byte * nbytes).from_address(self.host_ptr)
        self.array = np.frombuffer(memoryview(raw), dtype=dtype)
        self.nbytes = nbytes

    def device_array(self, dtype: Any, shape: tuple[int, ...]) -> Any:
        import cupy as cp

        mem = cp.cuda.UnownedMemory(self.dev_ptr, self.nbytes, self)
        return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))

    def free(self) -> None:
        import cupy as cp

        if self.host_ptr:
            cp.cuda.runtime.freeHost(self.host_ptr)
            self.host_ptr = 0


class BurstRunner:
    """Owns the receive buffer, the control block and results; ``run(requests)`` parses a burst."""

    mode: Mode = "launch"

    def __init__(self, capacity: int = 1024, *, timeout_s: float = 5.0) -> None:
        import cupy as cp

        self.capacity = capacity
        self.timeout_s = timeout_s
        self.rx = MappedBuffer(capacity * L.REQ_STRIDE)
        self.lens = MappedBuffer(capacity * 4, np.int32)
        self.ctrl = MappedBuffer(64, np.uint32)
        self.ctrl.array[:] = 0
        self.d_rx = self.rx.device_array(cp.uint8, (capacity * L.REQ_STRIDE,))
        self.d_lens = self.lens.device_array(cp.int32, (capacity,))
        self.d_ctrl = self.ctrl.device_array(cp.uint32, (16,))
        self.d_results = cp.zeros((capacity, L.NFIELDS), dtype=cp.int32)
        self.d_dbuf = cp.zeros(capacity * L.D_MAX, dtype=cp.uint8)
        # [0] blocks done (cumulative); [1..3] the persistent kernel's device-memory copy of the doorbell,
        # exit flag and burst size (gz_persistent: one block polls host memory, the rest poll this).
        self.d_blocks = cp.zeros(4, dtype=cp.uint32)
        self.stream = cp.cuda.Stream(non_blocking=True)
        mod = _module()
        self.k_parse = mod.get_function("gz_parse")
        self.k_ctrl = mod.get_function("gz_parse_ctrl")
        self.k_mirror = mod.get_function("gz_ctrl_mirror")
        self.k_done = mod.get_function("gz_ctrl_done")
        self.k_persistent = mod.get_function("gz_persistent")
        self.bursts = 0

    # -- landing bytes (the packet source's job) ------------------------------------------
    def land(self, requests: Sequence[bytes]) -> int:
        n = len(requests)
        if n > self.capacity:
            raise ValueError(f"burst of {n} exceeds capacity {self.capacity}")
        rx, lens = self.rx.array, self.lens.array
        for i, raw in enumerate(requests):
            raw = raw[:L.REQ_STRIDE]
            rx[i * L.REQ_STRIDE:i * L.REQ_STRIDE + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            lens[i] = len(raw)
        return n

    def start(self) -> None:
        """Prepare the mode (launch resident kernels, pre-post work)."""

    def stop(self) -> None:
        """Release the GPU: resident kernels exit, pre-posted work drains. Bounded in time."""
        self.stream.synchronize()

    def close(self) -> None:
        self.stop()
        for buf in (self.rx, self.lens, self.ctrl):
            buf.free()

    def trigger(self, n: int) -> None:
        """Start parsing the ``n`` landed requests and return once results are in device memory."""
        raise NotImplementedError

    def run(self, requests: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        n = self.land(requests)
        self.trigger(n)
        return self.d_results[:n].get(), self.d_dbuf[: n * L.D_MAX].get().reshape(n, L.D_MAX)

    def _wait_done(self, target: int) -> None:
        deadline = time.perf_counter() + self.timeout_s
        ctrl = self.ctrl.array
        while int(ctrl[C_DONE]) < target:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.mode}: burst {target} not done within {self.timeout_s}s")


class LaunchRunner(BurstRunner):
    mode: Mode = "launch"

    def trigger(self, n: int) -> None:
        self.k_parse((n,), (32,), (self.d_rx, self.d_lens, np.int32(n), self.d_results, self.d_dbuf),
                     stream=self.stream)
        self.stream.synchronize()
        self.bursts += 1


class PersistentRunner(BurstRunner):
    mode: Mode = "persistent"

    def __init__(self, capacity: int = 1024, *, blocks: int = 0, max_idle_s: float = 2.0, timeout_s: float = 5.0) -> None:
        super().__init__(capacity, timeout_s=timeout_s)
        import cupy as cp

        self.blocks = blocks or cp.cuda.Device().attributes["MultiProcessorCount"]
        self.max_idle_ns = int(max_idle_s * 1e9)
        self.running = False

    def start(self) -> None:
        ctrl = self.ctrl.array
        ctrl[C_EXIT] = 0
        seq = int(ctrl[C_DOORBELL])
        # Nothing runs on the stream now (first start, or after a synchronize): reset the block count and
        # the mirror, ordered before the launch on the same stream.
        self.d_blocks.set(np.array([0, seq, 0, 0], dtype=np.uint32), stream=self.stream)
        self.k_persistent((self.blocks,), (32,), (self.d_rx, self.d_lens, self.d_results, self.d_dbuf, self.d_ctrl, self.d_blocks,
                                                  np.uint32(seq), np.uint64(self.max_idle_ns)), stream=self.stream)
        deadline = time.perf_counter() + self.timeout_s
        while int(ctrl[C_ALIVE]) == 0:  # wait until resident, so a doorbell is never missed
            if time.perf_counter() > deadline:
                raise TimeoutError("persistent kernel did not start")
        self.running = True

    def trigger(self, n: int) -> None:
        ctrl = self.ctrl.array
        if not self.running or int(ctrl[C_ALIVE]) == 0:  # it idled out: start it again
            self.stream.synchronize()
            self.start()
        target = int(ctrl[C_DONE]) + 1
        ctrl[C_N] = n
        ctrl[C_DOORBELL] = int(ctrl[C_DOORBELL]) + 1  # x86 stores are ordered: N lands first
        self._wait_done(target)
        self.bursts += 1

    def stop(self) -> None:
        self.ctrl.array[C_EXIT] = 1
        self.stream.synchronize()
        self.running = False


class MemopsRunner(BurstRunner):
    mode: Mode = "memops"

    def __init__(self, capacity: int = 1024, *, depth: int = 4, use_graph: bool = True, timeout_s: float = 5.0) -> None:
        super().__init__(capacity, timeout_s=timeout_s)
        self.depth = depth
        self.use_graph = use_graph
        self.graph: Any = None
        self.posted = 0
        self.grid = min(capacity, 264)

    def _post_ops(self) -> None:
        from cuda.bindings import driver as cu

        hs = cu.CUstream(self.stream.ptr)
        bell = cu.CUdeviceptr(self.ctrl.dev_ptr + 4 * C_DOORBELL)
        (err,) = cu.cuStreamWaitValue32(hs, bell, 1, cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ)
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuStreamWaitValue32: {err}")
        (err,) = cu.cuStreamWriteValue32(hs, bell, 0, cu.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuStreamWriteValue32: {err}")
        # The burst size into device memory (one thread), the parse (grid), the done count (one thread).
        self.k_mirror((1,), (1,), (self.d_ctrl, self.d_blocks), stream=self.stream)
        self.k_ctrl((self.grid,), (32,), (self.d_rx, self.d_lens, self.d_results, self.d_dbuf, self.d_blocks),
                    stream=self.stream)
        self.k_done((1,), (1,), (self.d_ctrl,), stream=self.stream)

    def _post(self) -> None:
        if self.graph is not None:
            self.graph.launch(self.stream)
        else:
            self._post_ops()
        self.posted += 1

    def start(self) -> None:
        self.ctrl.array[C_EXIT] = 0
        self.ctrl.array[C_DOORBELL] = 0
        if self.use_graph and self.graph is None:
            try:
                self.stream.begin_capture()
                try:
                    self._post_ops()
                finally:
                    self.graph = self.stream.end_capture()
            except Exception:  # memops in graphs need a recent driver; fall back to direct posting
                self.graph = None
                self.use_graph = False
        for _ in range(self.depth):
            self._post()

    def trigger(self, n: int) -> None:
        ctrl = self.ctrl.array
        target = int(ctrl[C_DONE]) + 1
        ctrl[C_N] = n
        ctrl[C_DOORBELL] = 1
        self._wait_done(target)
        self.posted -= 1
        self._post()  # keep `depth` launches waiting for the next doorbell
        self.bursts += 1

    def stop(self) -> None:
        ctrl = self.ctrl.array
        ctrl[C_EXIT] = 1  # pre-posted launches run empty
        while self.posted > 0:
            target = int(ctrl[C_DONE]) + 1
            deadline = time.perf_counter() + self.timeout_s
            while int(ctrl[C_DOORBELL]) != 0:  # the previous launch has not consumed it yet
                if time.perf_counter() > deadline:
                    raise TimeoutError("memops: doorbell not consumed")
            ctrl[C_DOORBELL] = 1
            self._wait_done(target)
            self.posted -= 1
        self.stream.synchronize()


def make_runner(mode: str, capacity: int = 1024, **kwargs: Any) -> BurstRunner:
    """A runner for ``mode`` (``launch``, ``persistent`` or ``memops``), started."""
    classes: dict[str, type[BurstRunner]] = {"launch": LaunchRunner, "persistent": PersistentRunner,
                                              "memops": MemopsRunner}
    if mode not in classes:
        raise ValueError(f"unknown control-flow mode {mode!r}")
    runner = classes[mode](capacity, **kwargs)
    runner.start()
    return runner
