"""Where a gpu-plane feed process spends its CPU, on a machine without a GPU (issue 15's CPU per request).

Serves the gpu data plane with its kernels replaced by their CPU references (``python -m
tests.support.gpu_plane --workers N``: the real feed, pipeline, ring protocol and fast-front engine ring;
the fake engine, cache and auth off), loads it with wrk (``GET /inference?d=``, h100_bench's sentences), and
records one feed process with py-spy meanwhile. Prints the request rate and the share of the feed's samples
under each function (inclusive), with the functions that a GPU node runs as kernels marked: on a GPU the
feed does everything else, so the unmarked shares are what its Python costs per request.

    python benchmarks/gpu_feed_profile.py --wrk .carry/perf/wrk --out /tmp/gpu-feed [--feeds 1 --conns 32]
        [--edge gpu_build=gpu]

Numbers from a shared 2-core VM are shares and trends, not capacity: docs/benchmarks.md says which ran.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.h100_bench import CORES, Wrk  # noqa: E402
from tests.support.edge import EdgeProcess  # noqa: E402

# What the CUDA kernels do on a GPU node (their CPU references here): excluded from the feed's own cost.
KERNEL_REFERENCES = ("ReferenceDevice.parse_admit", "ReferenceDevice.build_ring", "ReferenceDevice.build_canned")


def feed_pids(root: int) -> list[int]:
    out = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "gpu_worker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return sorted(out)


def shares(raw: Path) -> tuple[int, list[tuple[str, float]]]:
    """Samples, and (function, % of samples with it on the stack) from py-spy's raw output."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        for name in {frame.split(" (")[0] for frame in stack.split(";")}:
            inclusive[name] += int(n)
    return total, [(name, round(100 * k / total, 1)) for name, k in inclusive.most_common(60)] if total else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wrk", type=Path, required=True, help="folder with usr/bin/wrk (Debian's package, unpacked)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--feeds", type=int, default=1)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--edge", action="append", default=[], metavar="KEY=VALUE",
                    help="an edge.* setting for the plane (e.g. gpu_build=gpu), repeatable")
    args = ap.parse_args()
    settings = {f"GAZSI_EDGE__{k.upper()}": v for k, _, v in (kv.partition("=") for kv in args.edge)}
    args.out.mkdir(parents=True, exist_ok=True)
    CORES["wrk"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    wrk = Wrk(args.wrk, args.out)
    with tempfile.TemporaryDirectory() as data:
        plane = EdgeProcess(Path(data), "--backend", "fake", "--no-auth", "--workers", str(args.feeds),
                            command=[sys.executable, "-m", "tests.support.gpu_plane"],
                            env={"GAZSI_CACHE__ENABLED": "false", "GAZSI_LOG_LEVEL": "warning", **settings,
                                 "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
        try:
            url = plane.url
            wrk.run(url, "inference", args.conns, 3)  # warm: the tokenizer, the engine ring, the slots
            feed = feed_pids(plane.proc.pid)[0]
            raw = args.out / "pyspy_feed.txt"
            spy = subprocess.Popen([pyspy, "record", "-d", str(round(args.duration)), "-r", "200", "--nonblocking",
                                    "-f", "raw", "-o", str(raw), "-p", str(feed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proc = psutil.Process(feed)
            cpu0 = sum(proc.cpu_times()[:2])
            load = wrk.run(url, "inference", args.conns, args.duration + 1)
            cpu_s = sum(proc.cpu_times()[:2]) - cpu0
            spy.wait(60)
        finally:
            plane.stop()
    total, top = shares(raw)
    kernels = sum(pct for name, pct in top if name in KERNEL_REFERENCES)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "edge": args.edge,
                              "feeds": args.feeds,
                              "conns": args.conns, "rps": round(load["rps"], 1), "errors": load["errors"],
                              "p50_ms": load["p50"] / 1e3, "samples": total, "kernel_reference_pct": kernels,
                              "inclusive_pct": top}
    if load["requests"]:
        # The feed's CPU per request, and the part of it a GPU node keeps (without the kernels' references).
        per_req = cpu_s * 1e6 / load["requests"] * args.feeds
        result["feed_cpu_us_per_req"] = round(per_req, 1)
        result["feed_cpu_us_per_req_without_kernels"] = round(per_req * (1 - kernels / 100), 1)
    (args.out / "gpu_feed_profile.json").write_text(json.dumps(result, indent=1))
    print(f"{result['date']}: {args.feeds} feed(s), c={args.conns}: {load['rps']:.0f} req/s, "
          f"p50 {load['p50'] / 1e3:.2f} ms, errors {load['errors']}; py-spy {total} samples of one feed, "
          f"{kernels:.1f} % in the kernels' CPU references; the feed's CPU {result.get('feed_cpu_us_per_req')} us a "
          f"request, {result.get('feed_cpu_us_per_req_without_kernels')} without them")
    print("\n| function (inclusive) | % of the feed's samples |\n|---|---|")
    for name, pct in top[:40]:
        print(f"| {name}{' (a kernel on a GPU)' if name in KERNEL_REFERENCES else ''} | {pct} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
