"""`gazsi up`, then the join command it printed, run as printed, as an edge on "another machine" (issue 17).

The outside edge has its own data directory and no key store of the cluster (``--no-auth``: key
enforcement for outside edges needs the cluster's shared PostgreSQL/Redis, not part of this run);
it joins over the control plane's HTTPS API with the token file and CA `up` wrote, opens its
reverse tunnel to the gateway, and answers part of the traffic the gateway routes; when it stops,
the Serve edge answers everything. Run by test_gazsi_up_outside.py inside ``unshare -n`` with its
own HOME; prints ``RESULT:{json}``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gazsi_cli.ports import free_port
from tests.support.ray_env import require_own_home

GAZSI = str(Path(sys.executable).parent / "gazsi")
BASE = [GAZSI, "--log-level", "warning"]
BODY = {"model": "all-MiniLM-L6-v2", "input": "from the outside"}


def join_command(out: str) -> str:
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if " edge serve --control-plane " in line:
            return line.strip().rstrip("\\").strip() + " " + lines[i + 1].strip()
    raise AssertionError("no join command printed:\n" + out)


def edge_requests(admin: str) -> int:
    """Embeddings this edge answered with 200 (its own /metrics)."""
    text = httpx.get(admin + "/metrics", timeout=5).text
    pattern = r'gazsi_requests_total\{[^}]*route="/v1/embeddings"[^}]*status="200"[^}]*\} ([\d.e+]+)'
    return sum(int(float(v)) for v in re.findall(pattern, text))


def main() -> None:
    require_own_home()
    data, outside = Path(tempfile.mkdtemp(prefix="gazsi-up-")), Path(tempfile.mkdtemp(prefix="gazsi-outside-"))
    gw = free_port()
    env = dict(os.environ, GAZSI_GATEWAY__PORT=str(gw), GAZSI_ENGINE__ONNX_THREADS="1")
    result: dict[str, Any] = {}
    proc = subprocess.run([*BASE, "up", "--data-dir", str(data), "--port", str(free_port()), "--timeout", "400"],
                          capture_output=True, text=True, env=env, timeout=500)
    result["up_rc"], result["up_out"] = proc.returncode, proc.stdout[-4000:] + proc.stderr[-2000:]
    edge: subprocess.Popen[str] | None = None
    try:
        if proc.returncode != 0:
            return
        key = re.search(r"export GAZSI_API_KEY=(\S+)", proc.stdout)[1]  # type: ignore[index]
        command = join_command(proc.stdout)
        result["join_command"] = command
        result["join_json"] = json.loads((data / "cluster" / "join.json").read_text())
        result["token_mode"] = oct((data / "cluster" / "join-token").stat().st_mode & 0o777)
        # As printed, plus what makes it a second node on this one machine (own data dir, any port).
        full = f"{command} --data-dir {outside} --port 0 --workers 1 --no-auth"
        # `gazsi` on PATH, as on a machine where it is installed (the command names no path of this one).
        outside_env = dict(env, PATH=f"{Path(GAZSI).parent}{os.pathsep}{env.get('PATH', '')}")
        edge = subprocess.Popen(["bash", "-c", f"exec {full}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=outside_env)
        assert edge.stdout is not None
        admin, lines = None, []
        deadline = time.monotonic() + 180
        while admin is None and time.monotonic() < deadline:
            line = edge.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"operator app .* on port (\d+)", line)
            admin = f"http://127.0.0.1:{m[1]}" if m else None
        result["edge_lines"] = lines[-10:]
        if admin is None:
            return
        tunnel_up = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(admin + "/readyz", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                ready = {}
            if (ready.get("tunnel") or {}).get("state") == "connected":
                tunnel_up = time.monotonic()
                break
            time.sleep(0.2)
        result["tunnel_connected"] = tunnel_up is not None
        result["control_plane_state"] = (ready.get("control_plane") or {}).get("state")
        time.sleep(1.0)  # the gateway's table refresh (0.25 s) and the node healthy after its heartbeats
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{gw}", headers=headers, timeout=30) as http:
            codes = [http.post("/v1/embeddings", json=BODY).status_code for _ in range(60)]
            result["codes"] = sorted(set(codes))
            result["outside_answered"] = edge_requests(admin)
            edge.send_signal(signal.SIGTERM)
            edge.wait(60)
            result["after_stop_codes"] = sorted({http.post("/v1/embeddings", json=BODY).status_code
                                                 for _ in range(30)})
    finally:
        if edge is not None and edge.poll() is None:
            edge.kill()
        down = subprocess.run([*BASE, "down", "--data-dir", str(data)], capture_output=True, text=True, env=env,
                              timeout=180)
        result["down_rc"] = down.returncode
        print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
