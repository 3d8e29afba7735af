"""Time to first embedding of `gazsi up` on embedded defaults, and how long `gazsi down` takes.

Run it as a new user meets it, from an empty HOME and data directory, in a private network
namespace (Ray binds to the host's address otherwise):

    unshare -n bash -c 'ip link set lo up; HOME=$(mktemp -d) .venv/bin/python benchmarks/up_timing.py'

Prints one JSON line: seconds from start to `up` returning, to the first 200 from the printed
gateway URL with the printed key, for `down`, and the load average before and after.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from gazsi_cli.ports import free_port

GAZSI = str(Path(sys.executable).parent / "gazsi")



def main() -> None:
    data = Path(tempfile.mkdtemp(prefix="gazsi-up-timing-"))
    env = dict(os.environ, GAZSI_GATEWAY__PORT=str(free_port()))
    result: dict[str, object] = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    started = time.monotonic()
    up = subprocess.run([GAZSI, "up", "--data-dir", str(data), "--port", str(free_port())],
                        capture_output=True, text=True, env=env, timeout=900)
    result["up_s"] = round(time.monotonic() - started, 1)
    try:
        if up.returncode != 0:
            raise SystemExit(f"gazsi up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
        url = re.search(r"gateway \(direct\):\s+(\S+)", up.stdout).group(1)  # type: ignore[union-attr]
        key = re.search(r"export GAZSI_API_KEY=(\S+)", up.stdout).group(1)  # type: ignore[union-attr]
        body = {"model": "all-MiniLM-L6-v2", "input": "hello world"}
        while True:
            r = httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        result["first_embedding_s"] = round(time.monotonic() - started, 1)
        result["progress_lines"] = [ln for ln in up.stdout.splitlines() if ln.startswith("gazsi: [")]
    finally:
        t = time.monotonic()
        down = subprocess.run([GAZSI, "down", "--data-dir", str(data)], capture_output=True, text=True, env=env,
                              timeout=300)
        result["down_s"] = round(time.monotonic() - t, 1)
        result["down_out"] = down.stdout.strip().splitlines()
        result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
