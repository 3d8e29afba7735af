"""GPU data plane micro-benchmarks: parse+build kernels per batch, control-flow modes per burst.

Run on a GPU machine:  python benchmarks/gpu_dataplane_bench.py  (prints a Markdown table)
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np


def _reqs(n: int) -> list[bytes]:
    return [f"GET /inference?d=hello%20world%20{i} HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer k{i}\r\n\r\n".encode()
            for i in range(n)]


def kernels(sizes: list[int]) -> None:
    import cupy as cp

    from edge_node.transports.gpu.kernels import GpuHttpEngine, jobs_for

    eng = GpuHttpEngine(max(sizes))
    print("| batch | parse kernel us | build kernel us | parse+build us/request |")
    print("|---|---|---|---|")
    for n in sizes:
        eng.load(_reqs(n))
        eng.upload(n)
        eng.launch_parse(n)
        res = eng.d_results[:n].get()
        eng.d_jobs[:n].set(jobs_for(res, [5] * n, [100] * n, [8] * n))
        start, end = cp.cuda.Event(), cp.cuda.Event()
        times = {}
        for name, fn in (("parse", lambda n=n: eng.launch_parse(n)), ("build", lambda n=n: eng.launch_build(n))):
            fn()
            start.record()
            for _ in range(50):
                fn()
            end.record()
            end.synchronize()
            times[name] = cp.cuda.get_elapsed_time(start, end) * 1000 / 50
        print(f"| {n} | {times['parse']:.1f} | {times['build']:.1f} | {(times['parse'] + times['build']) / n:.3f} |")


def modes(sizes: list[int], reps: int = 200) -> None:
    from edge_node.transports.gpu.control import make_runner

    print("\n| mode | burst | p50 us/burst | p99 us/burst | requests/s |")
    print("|---|---|---|---|---|")
    for mode in ("launch", "persistent", "memops"):
        runner = make_runner(mode, max(sizes))
        try:
            for n in sizes:
                runner.land(_reqs(n))
                for _ in range(10):
                    runner.trigger(n)
                lat = []
                for _ in range(reps):
                    t = time.perf_counter()
                    runner.trigger(n)
                    lat.append(time.perf_counter() - t)
                p50, p99 = statistics.median(lat), float(np.percentile(lat, 99))
                print(f"| {mode}{'' if mode != 'memops' else (' (graph)' if runner.graph is not None else ' (direct)')} "
                      f"| {n} | {p50 * 1e6:.1f} | {p99 * 1e6:.1f} | {n / p50:,.0f} |")
        finally:
            runner.close()


if __name__ == "__main__":
    import argparse

    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("all", "kernels", "modes"), default="all",
                    help="kernels alone: what ncu profiles (the persistent kernel cannot be replayed)")
    part = ap.parse_args().part
    props = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}  python {sys.version.split()[0]}  cupy {cp.__version__}\n")
    if part in ("all", "kernels"):
        kernels([16, 64, 256, 1024])
    if part in ("all", "modes"):
        modes([16, 64, 256, 1024])
