"""Why the doorbell modes of the GPU data plane are slow: host <-> GPU ping-pong through mapped pinned memory.

``benchmarks/gpu_dataplane_bench.py`` measured the persistent kernel (mode b) at 1.6-2.0 ms per burst and
stream memops (mode c) at 0.55-0.6 ms, where a plain launch took 30 us (docs/benchmarks.md). This probe
takes the kernels out and times one round trip at a time: the host writes ``flag = i`` into mapped pinned
memory, the GPU sees it and writes ``ack = i`` there, the host sees that. Each variant changes one thing:

* how the GPU reads the flag: a ``volatile`` load (what ``gz_persistent`` does) or ``ld.acquire.sys``;
* how it writes the ack: a ``volatile`` store (what ``gz_block_done`` does), the same followed by
  ``__threadfence_system()``, or ``st.release.sys``;
* ``__nanosleep`` between polls (200 ns as in ``gz_persistent``, or none), and how many blocks poll (1, or
  one per SM as the persistent kernel does);
* the stream memop: ``cuStreamWaitValue32`` on the host flag, then a one-thread kernel writing the ack;
* the baseline: a kernel launch that writes the ack, and the same with ``stream.synchronize()``.

Run on a GPU machine: ``python3 benchmarks/gpu_doorbell_probe.py [--iters 300]`` (prints a Markdown table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

_SRC = r"""
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }

__device__ __forceinline__ u32 load_flag(const u32* p, int acquire) {
    u32 v;
    if (acquire) asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    else v = *(const volatile u32*)p;
    return v;
}

__device__ __forceinline__ void store_ack(u32* p, u32 v, int how) {
    if (how == 2) { asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory"); return; }
    *(volatile u32*)p = v;
    if (how == 1) __threadfence_system();
}

// Every block's thread 0 polls the flag for 1..n; block 0 acknowledges each. Bounded: gives up after
// max_ns without a new flag (a host that died never leaves the GPU spinning).
extern "C" __global__ void pp_poll(const u32* flag, u32* ack, u32 n, int acquire, int ack_how, int sleep_ns,
                                   u64 max_ns) {
    if (threadIdx.x != 0) return;
    for (u32 i = 1; i <= n; ++i) {
        u64 t0 = now_ns();
        while (load_flag(flag, acquire) < i) {
            if (sleep_ns) __nanosleep(sleep_ns);
            if (now_ns() - t0 > max_ns) return;
        }
        if (blockIdx.x == 0) store_ack(ack, i, ack_how);
    }
}

extern "C" __global__ void pp_ack(u32* ack, u32 v, int ack_how) { store_ack(ack, v, ack_how); }
"""


def _spin_until(word: np.ndarray, value: int, timeout_s: float = 2.0) -> bool:
    deadline = time.perf_counter() + timeout_s
    while int(word[0]) < value:
        if time.perf_counter() > deadline:
            return False
    return True


class Probe:
    def __init__(self) -> None:
        import cupy as cp

        from edge_node.transports.gpu.control import MappedBuffer

        self.cp = cp
        self.mem = MappedBuffer(256, np.uint32)
        words = self.mem.device_array(cp.uint32, (64,))
        self.flag, self.d_flag = self.mem.array[0:1], words[0:1]
        self.ack, self.d_ack = self.mem.array[32:33], words[32:33]  # its own 128-byte line
        mod = cp.RawModule(code=_SRC, options=("--std=c++17",))
        self.k_poll = mod.get_function("pp_poll")
        self.k_ack = mod.get_function("pp_ack")
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.sms = int(cp.cuda.Device().attributes["MultiProcessorCount"])

    def reset(self) -> None:
        self.stream.synchronize()
        self.flag[0] = 0
        self.ack[0] = 0

    def polling(self, iters: int, *, blocks: int, acquire: int, ack_how: int, sleep_ns: int) -> list[float] | str:
        """Round trips with a resident polling kernel (mode b's shape)."""
        self.reset()
        self.k_poll((blocks,), (32,), (self.d_flag, self.d_ack, np.uint32(iters), np.int32(acquire),
                                       np.int32(ack_how), np.int32(sleep_ns), np.uint64(2_000_000_000)),
                    stream=self.stream)
        time.sleep(0.05)  # resident before the first doorbell
        out = []
        for i in range(1, iters + 1):
            t = time.perf_counter()
            self.flag[0] = i
            if not _spin_until(self.ack, i):
                self.flag[0] = iters + 1  # let it finish
                self.stream.synchronize()
                return f"no ack for doorbell {i} within 2 s"
            out.append(time.perf_counter() - t)
        self.stream.synchronize()
        return out

    def memops(self, iters: int, *, ack_how: int) -> list[float] | str:
        """Round trips through ``cuStreamWaitValue32`` on the host flag (mode c's shape), one posted ahead."""
        from cuda.bindings import driver as cu

        self.reset()
        hs = cu.CUstream(self.stream.ptr)
        bell = cu.CUdeviceptr(self.mem.dev_ptr)

        def post(i: int) -> None:
            (err,) = cu.cuStreamWaitValue32(hs, bell, i, cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
            if err != cu.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"cuStreamWaitValue32: {err}")
            self.k_ack((1,), (1,), (self.d_ack, np.uint32(i), np.int32(ack_how)), stream=self.stream)

        out = []
        post(1)
        for i in range(1, iters + 1):
            time.sleep(0.0002)  # the posted wait is parked on the GPU before the doorbell
            t = time.perf_counter()
            self.flag[0] = i
            if not _spin_until(self.ack, i):
                self.flag[0] = iters + 1
                self.stream.synchronize()
                return f"no ack for doorbell {i} within 2 s"
            out.append(time.perf_counter() - t)
            if i < iters:
                post(i + 1)
        self.stream.synchronize()
        return out

    def launch(self, iters: int, *, ack_how: int, sync: bool) -> list[float] | str:
        """A launch per round trip; the host sees the ack in mapped memory (or synchronises the stream)."""
        self.reset()
        out = []
        for i in range(1, iters + 1):
            t = time.perf_counter()
            self.k_ack((1,), (1,), (self.d_ack, np.uint32(i), np.int32(ack_how)), stream=self.stream)
            if sync:
                self.stream.synchronize()
            elif not _spin_until(self.ack, i):
                return f"no ack for launch {i} within 2 s"
            out.append(time.perf_counter() - t)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    import cupy as cp

    probe = Probe()
    props = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}  SMs {probe.sms}  python {sys.version.split()[0]}  cupy {cp.__version__}")
    acks = {0: "volatile store", 1: "volatile store + threadfence_system", 2: "st.release.sys"}
    cases: list[tuple[str, Callable[[], list[float] | str]]] = [
        ("launch, host polls ack", lambda: probe.launch(args.iters, ack_how=0, sync=False)),
        ("launch + stream.synchronize()", lambda: probe.launch(args.iters, ack_how=0, sync=True)),
    ]
    for blocks in (1, probe.sms):
        for acquire in (0, 1):
            for ack_how in (0, 1, 2):
                for sleep_ns in (200, 0):
                    if blocks > 1 and (ack_how == 1 or sleep_ns == 0):
                        continue  # the full grid only in the persistent kernel's own shape and the fixes
                    name = (f"poll: {blocks} block(s), {'ld.acquire.sys' if acquire else 'volatile load'}, "
                            f"{acks[ack_how]}, nanosleep {sleep_ns}")
                    cases.append((name, lambda b=blocks, a=acquire, h=ack_how, s=sleep_ns:
                                  probe.polling(args.iters, blocks=b, acquire=a, ack_how=h, sleep_ns=s)))
    for ack_how in (0, 1, 2):
        cases.append((f"memops: cuStreamWaitValue32 on host flag, {acks[ack_how]}",
                      lambda h=ack_how: probe.memops(args.iters, ack_how=h)))
    print("\n| variant | p50 us | p90 us | p99 us | max us |")
    print("|---|---|---|---|---|")
    for name, run in cases:
        got = run()
        if isinstance(got, str):
            print(f"| {name} | {got} | | | |")
            continue
        us = np.asarray(got[10:] or got) * 1e6
        print(f"| {name} | {statistics.median(us):.1f} | {np.percentile(us, 90):.1f} | "
              f"{np.percentile(us, 99):.1f} | {us.max():.1f} |", flush=True)
    probe.mem.free()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
