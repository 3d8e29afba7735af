"""A cold gateway's first seconds (issue 14's 503s): a freshly started edge, a freshly started gateway
direct listener in front of it, hit at once by wrk with many connections; every answer's status counted.

For each tree (this one, and ``--before-tree`` if given, run with its own copy of
``gateway_direct_bench.py``) and each ``--conns``: a new edge (fast front, fake engine, 1 worker), a new
gateway, then two wrk runs of ``--duration`` s, the first starting as soon as the gateway's ``/healthz``
answers (which does not touch the edge):

    python3 benchmarks/gateway_cold_start.py --wrk .carry/perf/wrk --out /tmp/gwcold --before-tree /tmp/gw-before
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_direct_bench import start_edge, start_gateway, stop, wait_ok  # noqa: E402
from benchmarks.h100_bench import CORES, Wrk  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wrk", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--before-tree", type=Path)
    ap.add_argument("--conns", default="256,1000")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--gateway-cores", default="0")
    ap.add_argument("--edge-cores", default="1")
    ap.add_argument("--wrk-cores", default="1")
    args = ap.parse_args()
    CORES["wrk"] = args.wrk_cores
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wrk = Wrk(args.wrk, out)
    trees = {"after": ROOT, **({"before": args.before_tree.resolve()} if args.before_tree else {})}
    results: dict[str, Any] = {}
    for label, tree in trees.items():
        for conns in (int(c) for c in args.conns.split(",")):
            env = {**os.environ, "GAZSI_AUTH__ENABLED": "false", "GAZSI_CACHE__ENABLED": "false",
                   "GAZSI_LOG_LEVEL": "warning", "GAZSI_DATA_DIR": str(out / f"data-{label}-{conns}"),
                   "PYTHONPATH": str(tree)}
            edge = start_edge(tree, env, args.edge_cores, "fake", out / f"edge_{label}_{conns}.log")
            try:
                wait_ok("http://127.0.0.1:8401/readyz")
                gw = start_gateway(tree, env, args.gateway_cores, "direct", 8410, out / f"gateway_{label}_{conns}.log")
                try:
                    wait_ok("http://127.0.0.1:8410/healthz")
                    for run in (1, 2):
                        r = wrk.run("http://127.0.0.1:8410", "single", conns, args.duration, statuses=True)
                        r["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
                        results[f"{label} c={conns} run {run}"] = r
                        print(f"{label:6s} c={conns:5d} run {run}: {r['requests']:7,d} answers  p50 {r['p50'] / 1e3:7.1f} ms  "
                              f"statuses {r.get('statuses')}  wrk errors (non-2xx included) {r['errors']}  load {' '.join(r['loadavg'])}",
                              flush=True)
                finally:
                    stop(gw, 20)
            finally:
                stop(edge, 30)
    (out / "gateway_cold_start.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
