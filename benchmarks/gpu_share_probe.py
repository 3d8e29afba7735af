"""Why a feed's tiny GPU round trip takes ~0.6 ms beside the engine under MPS, when it takes ~30 us alone.

Two clients of one private MPS daemon (the node's own, ``edge_node.mps``), as on a gpu node:

* the *load*: another process replaying a CUDA graph of eight kernels that fill every SM (about the time of
  one engine batch) back to back, with ``depth`` replays queued on its stream (the engine's
  ``batcher.pipeline_depth``), optionally held to a share of the SMs (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``);
* the *probe*: this process, timing a one-thread kernel launch until its event is done (spinning, so no
  interrupt is timed), on a default- or greatest-priority stream, one every 0.5 ms.

Run on a GPU machine: ``python benchmarks/gpu_share_probe.py`` (prints a Markdown table).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_LOAD = r"""
import sys, time
import cupy as cp
depth, seconds = int(sys.argv[1]), float(sys.argv[2])
busy = cp.RawKernel(r'extern "C" __global__ void busy(float* x, int iters) {'
                    r' float a = x[threadIdx.x], b = 1.0001f;'
                    r' for (int i = 0; i < iters; ++i) a = fmaf(a, b, 1e-7f);'
                    r' x[blockIdx.x * blockDim.x + threadIdx.x] = a; }', "busy")
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
x = cp.ones(sms * 8 * 256, dtype=cp.float32)
s = cp.cuda.Stream(non_blocking=True)
s.begin_capture()
for _ in range(8):  # eight kernels filling every SM, about one engine batch together
    busy((sms * 8,), (256,), (x, cp.int32(80000)), stream=s)
g = s.end_capture()
t = time.perf_counter(); g.launch(s); s.synchronize()
print(f"graph {1e3 * (time.perf_counter() - t):.2f} ms", flush=True)
pending = []
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    g.launch(s)
    e = cp.cuda.Event(disable_timing=True); e.record(s); pending.append(e)
    if len(pending) >= depth:
        pending.pop(0).synchronize()
s.synchronize()
"""


def probe(priority: str, n: int = 300) -> list[float]:
    import cupy as cp

    from edge_node.transports.gpu.device import open_stream

    k = cp.RawKernel(r'extern "C" __global__ void one(int* x) { x[0] += 1; }', "one")
    x = cp.zeros(1, dtype=cp.int32)
    stream, free = open_stream(priority)
    ev = cp.cuda.Event(block=False, disable_timing=True)
    lat = []
    try:
        for i in range(n + 20):
            t = time.perf_counter()
            k((1,), (1,), (x,), stream=stream)
            ev.record(stream)
            while not ev.done:
                pass
            if i >= 20:
                lat.append(time.perf_counter() - t)
            time.sleep(0.0005)
    finally:
        free()
    return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="how long each load runs (the probe inside it)")
    args = ap.parse_args()
    from edge_node.mps import start_mps

    daemon = start_mps("on")
    assert daemon is not None
    cases = [("no load", 0, 100, "default"), ("load, depth 1", 1, 100, "default"),
             ("load, depth 2", 2, 100, "default"), ("load, depth 4", 4, 100, "default"),
             ("load, depth 2, load at 50 % of the SMs", 2, 50, "default"),
             ("load, depth 2, probe stream at the greatest priority", 2, 100, "high")]
    print("| case | probe round trip p50 us | p90 us | p99 us |")
    print("|---|---|---|---|")
    try:
        for name, depth, pct, prio in cases:
            load = None
            if depth:
                env = {**os.environ, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(pct)}
                load = subprocess.Popen([sys.executable, "-c", _LOAD, str(depth), str(args.seconds)], env=env,
                                        stdout=subprocess.PIPE, text=True)
                assert load.stdout is not None
                said = load.stdout.readline().strip()
                time.sleep(0.3)
            else:
                said = ""
            lat = probe(prio)
            if load is not None:
                load.wait(args.seconds + 30)
            us = [v * 1e6 for v in lat]
            print(f"| {name} {('(' + said + ')') if said else ''} | {statistics.median(us):.1f} | "
                  f"{float(np.percentile(us, 90)):.1f} | {float(np.percentile(us, 99)):.1f} |", flush=True)
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
