"""The README's main job as a new user meets it: `gazsi up` from an empty HOME, the printed example
run as printed, `gazsi status`, `gazsi down`, then a second `up` on the same data directory (the
admin key exists: the examples read it from $GAZSI_API_KEY), and an `up` whose Ray head dies
mid-deploy (it must fail fast, stop what it started, and leave `down` nothing to claim).

Run by test_gazsi_up.py inside ``unshare -n`` with HOME an empty directory; prints ``RESULT:{json}``.
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
from typing import Any

import httpx
import psutil

from gazsi_cli.local_ray import LocalRay
from gazsi_cli.ports import free_port
from tests.support.ray_env import require_own_home

GAZSI = str(Path(sys.executable).parent / "gazsi")
BASE = [GAZSI, "--log-level", "warning"]



def printed_curl(out: str) -> str:
    """The embeddings `curl` example exactly as `up` printed it (two lines joined by `\\`)."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("curl -s") and "/v1/embeddings" in line:
            return line.strip().rstrip("\\").strip() + " " + lines[i + 1].strip()
    raise AssertionError("no curl example printed:\n" + out)


def run_printed(command: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True,
                          env=env, timeout=60)
    body, _, code = proc.stdout.rpartition("\n")
    try:
        dims = len(json.loads(body)["data"][0]["embedding"])
    except (ValueError, KeyError, IndexError, TypeError):
        dims = None
    return {"status": code.strip(), "dims": dims, "body": body[:300]}


def up(data: Path, proxy: int, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run([*BASE, "up", "--data-dir", str(data), "--port", str(proxy), "--timeout", "400"],
                          capture_output=True, text=True, env=env, timeout=500)
    return proc, time.monotonic() - started


def down(data: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run([*BASE, "down", "--data-dir", str(data)], capture_output=True, text=True, env=env,
                          timeout=180)
    return proc, time.monotonic() - started


def leftovers(data: Path) -> list[str]:
    """Processes of this data directory's cluster still alive (Ray's, the embedded Redis)."""
    names = [" ".join(p.cmdline()[:3])[:120] for p in LocalRay.for_data_dir(data).processes()]
    redis_state = data / "redis" / "state.json"
    if redis_state.exists():
        pid = int(json.loads(redis_state.read_text()).get("pid", 0))
        if pid and psutil.pid_exists(pid):
            names.append(f"redis pid {pid}")
    return names


def first_run(data: Path, proxy: int, gw: int, env: dict[str, str], result: dict[str, Any]) -> None:
    proc, result["up_s"] = up(data, proxy, env)
    result.update(up_rc=proc.returncode, up_out=proc.stdout[-4000:], up_err=proc.stderr[-3000:])
    if proc.returncode != 0:
        return
    # Once healthy, `up` says which data plane each edge runs and why (what the edge told the control plane).
    result["dataplane_lines"] = [ln for ln in proc.stdout.splitlines()
                                 if ln.startswith(("gazsi: edge ", "gazsi: the edges' data planes"))]
    found = re.search(r"admin key \(shown once, stored hashed\): (gz_[A-Za-z0-9_-]+)", proc.stdout)
    result["admin_key_shown"] = bool(found)
    if not found:
        return
    key = found.group(1)
    result["direct_url_printed"] = f"gateway (direct):       http://127.0.0.1:{gw}" in proc.stdout
    stored = b"".join(p.read_bytes() for p in data.glob("*.sqlite3*"))
    result["db_files"] = sorted(p.name for p in data.glob("*.sqlite3*"))
    result["plain_key_in_db"] = key.encode() in stored
    # The printed lines, pasted as printed: `export GAZSI_API_KEY=…` then the curl example.
    export = re.search(r"export GAZSI_API_KEY=(\S+)", proc.stdout)
    result["export_line_has_key"] = bool(export) and export.group(1) == key  # type: ignore[union-attr]
    result["printed_curl"] = run_printed(printed_curl(proc.stdout), dict(env, GAZSI_API_KEY=key))
    result["first_embedding_s"] = result["up_s"]  # `up` returns once the gateway routes to an edge
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "all-MiniLM-L6-v2", "input": "hello world"}
    result["proxy_status"] = httpx.post(f"http://127.0.0.1:{proxy}/v1/embeddings", json=body, headers=auth,
                                        timeout=60).status_code
    keys = subprocess.run([*BASE, "keys", "--data-dir", str(data), "list"], capture_output=True, text=True,
                          env=env, timeout=60)
    result["keys_list_has_prefix"] = key[:12] in keys.stdout and key not in keys.stdout
    revoke_probe = subprocess.run([*BASE, "keys", "--data-dir", str(data), "create", "--name", "probe"],
                                  capture_output=True, text=True, env=env, timeout=60)
    probe_id = revoke_probe.stdout.split()[0] if revoke_probe.returncode == 0 else ""
    revoked = subprocess.run([*BASE, "keys", "--data-dir", str(data), "revoke", probe_id], capture_output=True,
                             text=True, env=env, timeout=60)
    result["revoke_out"] = revoked.stdout
    status = subprocess.run([*BASE, "status", "--data-dir", str(data)], capture_output=True, text=True,
                            env=env, timeout=120)
    result["status_rc"], result["status_out"] = status.returncode, status.stdout[-2000:]
    result["key"] = key


def main() -> None:
    require_own_home()  # run by its test (run_scenario gives it an empty HOME), never in the user's
    data = Path(tempfile.mkdtemp(prefix="gazsi-up-"))
    proxy, gw = free_port(), free_port()
    env = dict(os.environ, GAZSI_GATEWAY__PORT=str(gw), GAZSI_ENGINE__ONNX_THREADS="1")
    result: dict[str, Any] = {"home": env["HOME"]}
    try:
        first_run(data, proxy, gw, env, result)
    finally:
        proc, result["down_s"] = down(data, env)
        result.update(down_rc=proc.returncode, down_out=proc.stdout[-2000:] + proc.stderr[-2000:])
    result["leftovers_after_down"] = leftovers(data)
    try:
        httpx.get(f"http://127.0.0.1:{gw}/healthz", timeout=2)
        result["gateway_after_down"] = "up"
    except httpx.HTTPError:
        result["gateway_after_down"] = "gone"

    # Second `up`: the admin key exists, so the examples must take it from $GAZSI_API_KEY.
    if result.get("key"):
        try:
            proc, result["second_up_s"] = up(data, proxy, env)
            result["second_up_rc"] = proc.returncode
            result["second_up_out"] = proc.stdout[-3000:] + proc.stderr[-2000:]
            if proc.returncode == 0:
                result["second_printed_curl"] = run_printed(printed_curl(proc.stdout),
                                                            dict(env, GAZSI_API_KEY=result["key"]))
        finally:
            proc, _ = down(data, env)
            result["second_down_rc"] = proc.returncode
        result["leftovers_after_second_down"] = leftovers(data)

    ray_dies(Path(tempfile.mkdtemp(prefix="gazsi-up-dies-")), env, result)
    result["home_ray_dir"] = sorted(p.name for p in (Path(env["HOME"]) / ".ray").glob("*"))
    print("RESULT:" + json.dumps(result), flush=True)


def ray_dies(data: Path, env: dict[str, str], result: dict[str, Any]) -> None:
    """Kill the head's GCS while `up` deploys: `up` must fail fast and undo, `down` must find nothing."""
    head = LocalRay.for_data_dir(data)
    started = time.monotonic()
    proc = subprocess.Popen([*BASE, "up", "--data-dir", str(data), "--port", str(free_port()), "--timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(env, GAZSI_GATEWAY__PORT=str(free_port())))
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "deploying" in line:
            break
    killed = [p for p in head.processes() if "gcs_server" in p.name()]
    for p in killed:
        p.kill()
    killed_at = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    result["dies"] = {
        "killed_gcs": len(killed), "rc": proc.returncode, "exit_after_kill_s": round(time.monotonic() - killed_at, 1),
        "out": ("".join(lines) + out)[-3000:], "total_s": round(time.monotonic() - started, 1),
        "leftovers": leftovers(data),
    }
    after = subprocess.run([*BASE, "down", "--data-dir", str(data)], capture_output=True, text=True, env=env,
                           timeout=120)
    result["dies"]["down_out"] = after.stdout + after.stderr


if __name__ == "__main__":
    main()
