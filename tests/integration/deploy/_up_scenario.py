"""`gazsi up` on embedded defaults, a call with the admin key it printed, `gazsi status`, `gazsi down`.

Run by test_gazsi_up.py inside ``unshare -n``; prints ``RESULT:{json}``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

GAZSI = str(Path(sys.executable).parent / "gazsi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    data = Path(tempfile.mkdtemp(prefix="gazsi-up-"))
    proxy, gw = free_port(), free_port()
    env = dict(os.environ, GAZSI_GATEWAY__PORT=str(gw), GAZSI_ENGINE__ONNX_THREADS="1")
    base = [GAZSI, "--log-level", "warning"]
    up = subprocess.run([*base, "up", "--data-dir", str(data), "--port", str(proxy), "--timeout", "400"],
                        capture_output=True, text=True, env=env, timeout=500)
    result: dict = {"up_rc": up.returncode, "up_out": up.stdout[-3000:], "up_err": up.stderr[-3000:]}
    try:
        found = re.search(r"admin key \(shown once, stored hashed\): (gz_[A-Za-z0-9_-]+)", up.stdout)
        result["admin_key_shown"] = bool(found)
        if found:
            key = found.group(1)
            stored = b"".join(p.read_bytes() for p in data.glob("*.sqlite3*"))
            result["db_files"] = sorted(p.name for p in data.glob("*.sqlite3*"))
            result["plain_key_in_db"] = key.encode() in stored
            auth = {"Authorization": f"Bearer {key}"}
            body = {"model": "all-MiniLM-L6-v2", "input": "hello world"}
            r = httpx.post(f"http://127.0.0.1:{gw}/v1/embeddings", json=body, headers=auth, timeout=60)
            result["direct_status"] = r.status_code
            result["dims"] = len(r.json()["data"][0]["embedding"]) if r.status_code == 200 else None
            r = httpx.post(f"http://127.0.0.1:{proxy}/v1/embeddings", json=body, headers=auth, timeout=60)
            result["proxy_status"] = r.status_code
            keys = subprocess.run([*base, "keys", "--data-dir", str(data), "list"], capture_output=True, text=True,
                                  env=env, timeout=60)
            result["keys_list_has_prefix"] = key[:12] in keys.stdout and key not in keys.stdout
        status = subprocess.run([*base, "status", "--data-dir", str(data)], capture_output=True, text=True,
                                env=env, timeout=120)
        result["status_rc"], result["status_out"] = status.returncode, status.stdout[-2000:]
    finally:
        down = subprocess.run([*base, "down", "--data-dir", str(data)], capture_output=True, text=True, env=env,
                              timeout=180)
        result["down_rc"] = down.returncode
    try:
        httpx.get(f"http://127.0.0.1:{gw}/healthz", timeout=2)
        result["gateway_after_down"] = "up"
    except httpx.HTTPError:
        result["gateway_after_down"] = "gone"
    print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
