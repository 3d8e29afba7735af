"""Markdown table and latency-vs-load PNG for benchmarks/h100_bench.py results (JSON in, text/PNG out).

    python3 benchmarks/_h100_report.py out/h100_bench.json docs/h100_latency.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["plot", "table"]


def _ms(us: float) -> str:
    return f"{us / 1e3:.2f}"


def ceiling_max(results: dict[str, Any], seq: int = 16) -> float:
    rows = [r for r in results.get("ceiling", []) if r["seq"] == seq]
    return max((r["seq_per_s"] for r in rows), default=0.0)


def table(results: dict[str, Any]) -> str:
    lines = []
    ceil = results.get("ceiling", [])
    if ceil:
        lines += ["Model-only ceiling (CUDA-graph engine, fp16, no HTTP):", "",
                  "| seq | batch | ms | seq/s |", "|---|---|---|---|"]
        lines += [f"| {r['seq']} | {r['batch']} | {r['ms_mean']:.3f} | {r['seq_per_s']:,.0f} |" for r in ceil]
        lines.append("")
    lines += ["| system | request | saturation req/s | seq/s | p50 ms | p99 ms | mean batch | CPU ms/req | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    per = {"single": 1, "batch32": 32, "long": 1, "inference": 1}
    for name, res in results.get("systems", {}).items():
        if "saturation" not in res:
            lines.append(f"| {name} | - | not measured: {res.get('error', '?')} | | | | | | |")
            continue
        for kind, r in res["saturation"].items():
            mb = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "n/a"
            cpu = f"{r['cpu_ms_per_req']:.3f}" if "cpu_ms_per_req" in r else "n/a"
            lines.append(f"| {name} | {kind} (c={r['conns']}) | {r['rps']:,.0f} | {r['rps'] * per[kind]:,.0f} | "
                         f"{_ms(r['p50'])} | {_ms(r['p99'])} | {mb} | {cpu} | {r['errors']} |")
    lines += ["", "| system | target load | achieved req/s (share of own saturation) | p50 ms | p95 ms | p99 ms | mean batch |",
              "|---|---|---|---|---|---|---|"]
    for name, res in results.get("systems", {}).items():
        for frac, r in res.get("latency", {}).items():
            mb = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "n/a"
            lines.append(f"| {name} | {float(frac):.0%} | {r['rps']:,.0f} ({r['load_frac']:.0%}) | {_ms(r['p50'])} | "
                         f"{_ms(r['p95'])} | {_ms(r['p99'])} | {mb} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, res in results.get("systems", {}).items():
        pts = [(r["rps"], r["p50"] / 1e3, r["p99"] / 1e3) for r in res.get("latency", {}).values()]
        sat = res.get("saturation", {})
        main = sat.get("single") or sat.get("inference")
        if main:
            pts.append((main["rps"], main["p50"] / 1e3, main["p99"] / 1e3))
        if not pts:
            continue
        pts.sort()
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} p50")[0]
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", color=line.get_color(),
                label=f"{name} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("achieved load (single-input requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Latency vs load, {results.get('machine', {}).get('gpu', 'GPU')}, {results.get('date', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    print(table(data))
    if len(sys.argv) > 2:
        plot(data, Path(sys.argv[2]))
