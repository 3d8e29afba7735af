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


def memops_probe(reps: int = 200) -> None:
    """Where mode (c)'s time goes: the same doorbell round trip with less and less after the stream's wait.

    * ``wait+write``: a graph of cuStreamWaitValue32 on the doorbell (mapped host memory), its reset and a
      cuStreamWriteValue32 of the done word: the GPU front end's wait alone, no kernel;
    * ``memops grid=G``: the runner of mode (c) with its parse launched on G blocks (until 302e4f5 every block
      read the burst size from mapped host memory and fenced to system scope to count itself: 543 us on 264
      blocks; now one thread mirrors the size and one counts the burst done);
    * ``memops direct``: the same operations posted one by one instead of as a graph.
    """
    import cupy as cp
    from cuda.bindings import driver as cu

    from edge_node.transports.gpu.control import C_DONE, C_DOORBELL, MappedBuffer, MemopsRunner

    print("\n| memops probe (burst of 16) | p50 us | p99 us |")
    print("|---|---|---|")

    def row(name: str, lat: list[float]) -> None:
        print(f"| {name} | {statistics.median(lat) * 1e6:.1f} | {float(np.percentile(lat, 99)) * 1e6:.1f} |")

    ctrl = MappedBuffer(64, np.uint32)
    ctrl.array[:] = 0
    stream = cp.cuda.Stream(non_blocking=True)
    hs = cu.CUstream(stream.ptr)
    bell = cu.CUdeviceptr(ctrl.dev_ptr + 4 * C_DOORBELL)
    done = cu.CUdeviceptr(ctrl.dev_ptr + 4 * C_DONE)
    stream.begin_capture()
    for (err,) in (cu.cuStreamWaitValue32(hs, bell, 1, cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ),
                   cu.cuStreamWriteValue32(hs, bell, 0, cu.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT),
                   cu.cuStreamWriteValue32(hs, done, 1, cu.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)):
        if err != cu.CUresult.CUDA_SUCCESS:  # a refused memop would time nothing: say so instead
            raise RuntimeError(f"stream memop refused: {err}")
    graph = stream.end_capture()
    arr, lat = ctrl.array, []
    for i in range(reps + 10):
        arr[C_DONE] = 0
        graph.launch(stream)
        time.sleep(0.0002)  # the wait is posted and polling before the bell rings, as in the runner
        t = time.perf_counter()
        arr[C_DOORBELL] = 1
        while arr[C_DONE] != 1:
            pass
        if i >= 10:
            lat.append(time.perf_counter() - t)
        stream.synchronize()
    row("wait+write (graph, no kernel)", lat)
    ctrl.free()
    reqs = _reqs(16)
    for grid, graph_on in ((1, True), (16, True), (264, True), (264, False)):
        runner = MemopsRunner(1024, use_graph=graph_on)
        runner.grid = grid
        runner.start()
        try:
            runner.land(reqs)
            lat = []
            for i in range(reps + 10):
                t = time.perf_counter()
                runner.trigger(16)
                if i >= 10:
                    lat.append(time.perf_counter() - t)
            row(f"memops grid={grid} ({'graph' if runner.graph is not None else 'direct'})", lat)
        finally:
            runner.close()


if __name__ == "__main__":
    import argparse

    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("all", "kernels", "modes", "memops-probe"), default="all",
                    help="kernels alone: what ncu profiles (the persistent kernel cannot be replayed)")
    part = ap.parse_args().part
    props = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}  python {sys.version.split()[0]}  cupy {cp.__version__}\n")
    if part in ("all", "kernels"):
        kernels([16, 64, 256, 1024])
    if part in ("all", "modes"):
        modes([16, 64, 256, 1024])
    if part in ("all", "memops-probe"):
        memops_probe()
