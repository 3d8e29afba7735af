"""What an idle ``gazsi up`` cluster costs in CPU, per Ray process (issue 14: the 2-core ratio).

Starts ``gazsi up --profile PROFILE`` with its own HOME, waits ``--settle`` seconds, samples each process's
CPU time over ``--seconds``, prints cores per process (and writes them as JSON), then ``gazsi down``. Run it
in a private network namespace with a Ray of its own, as the tests do:

    unshare -rn sh -c 'ip link set lo up; PATH=.venv/bin:$PATH .venv/bin/python benchmarks/idle_cluster_cpu.py'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--backend", default="onnx-cpu")
    ap.add_argument("--settle", type=float, default=15.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("idle_cluster_cpu.json"))
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gz-idle-home-"))
    env = {**os.environ, "HOME": str(home), "GAZSI_DATA_DIR": str(home / "data"), "GAZSI_AUTH__ENABLED": "false",
           "GAZSI_ENGINE__BACKEND": args.backend, "GAZSI_LOG_LEVEL": "warning"}
    gazsi = [sys.executable, "-m", "gazsi_cli.main"]
    up = subprocess.run([*gazsi, "up", "--profile", args.profile, "--timeout", "300"], env=env, cwd=ROOT,
                        capture_output=True, text=True, check=False)
    try:
        if up.returncode != 0:
            print(up.stdout[-2000:], up.stderr[-2000:], sep="\n")
            return 1
        time.sleep(args.settle)
        # Every process the cluster started carries its HOME (gazsi up hands its environment to Ray).
        procs = [(p, " ".join(p.info["cmdline"] or [])[:80]) for p in psutil.process_iter(["pid", "cmdline"])
                 if _home(p) == str(home)]
        before = {p.pid: _cpu(p) for p, _ in procs}
        time.sleep(args.seconds)
        after = {p.pid: _cpu(p) for p, _ in procs}
        cores = sorted(((cmd, round((after[p.pid] - before[p.pid]) / args.seconds, 3)) for p, cmd in procs
                        if before[p.pid] >= 0 and after[p.pid] >= 0), key=lambda kv: -kv[1])
        for cmd, c in cores:
            print(f"{c:6.3f} cores  {cmd}")
        print(f"{sum(c for _, c in cores):6.3f} cores in all")
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "profile": args.profile, "seconds": args.seconds, "cores": cores}, indent=1))
        return 0
    finally:
        subprocess.run([*gazsi, "down"], env=env, cwd=ROOT, capture_output=True, check=False)


def _home(p: psutil.Process) -> str | None:
    try:
        home: str | None = p.environ().get("HOME")
        return home
    except psutil.Error:
        return None


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return -1.0


if __name__ == "__main__":
    raise SystemExit(main())
