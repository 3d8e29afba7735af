"""Keys and limits on a fresh `gazsi up --edges 2` (issue 18's "done when"), through the real
entry points: keys made and revoked with the `gazsi keys` CLI, traffic straight to both edges.

- a key with N requests/min, hammered on both edges at once, gets exactly N answers;
- a revoked key is refused by both edges within a second of `gazsi keys revoke` returning;
- an edge replica killed with SIGKILL right after answering loses none of its answered usage.

Run by test_gazsi_up.py inside ``unshare -n`` with HOME an empty directory; prints ``RESULT:{json}``.
"""

from __future__ import annotations

import asyncio
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

from gazsi_cli.local_ray import LocalRay
from gazsi_cli.ports import free_port
from tests.support.ray_env import require_own_home

GAZSI = str(Path(sys.executable).parent / "gazsi")
BASE = [GAZSI, "--log-level", "warning"]
RPM = 24
BODY = {"model": "all-MiniLM-L6-v2", "input": "hello world"}



def keys(data: Path, env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run([*BASE, "keys", "--data-dir", str(data), "--json", *args], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def edge_urls(gateway: str, admin: str, want: int, limit_s: float = 60) -> list[str]:
    """Both edges, from `/v1/route` (p2c spreads the answers over the table)."""
    found: set[str] = set()
    deadline = time.monotonic() + limit_s
    while len(found) < want and time.monotonic() < deadline:
        r = httpx.get(f"{gateway}/v1/route", headers={"Authorization": f"Bearer {admin}"}, timeout=10)
        if r.status_code == 200:
            found.add(r.json()["url"])
        else:
            time.sleep(0.5)
    return sorted(found)


async def hammer(urls: list[str], key: str, total: int) -> dict[str, Any]:
    """`total` requests at once, alternating edges; counts answers per edge and status."""
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        async def one(i: int) -> tuple[str, int, str | None]:
            url = urls[i % len(urls)]
            r = await client.post(f"{url}/v1/embeddings", json={**BODY, "input": f"text {i}"}, headers=headers)
            return url, r.status_code, r.headers.get("retry-after")

        results = await asyncio.gather(*[one(i) for i in range(total)])
    per_edge: dict[str, dict[str, int]] = {}
    for url, status, _ in results:
        per_edge.setdefault(url, {}).setdefault(str(status), 0)
        per_edge[url][str(status)] += 1
    return {"ok": sum(1 for _, s, _ in results if s == 200), "limited": sum(1 for _, s, _ in results if s == 429),
            "other": sorted({s for _, s, _ in results if s not in (200, 429)}),
            "retry_after_on_429": all(ra is not None for _, s, ra in results if s == 429), "per_edge": per_edge}


def revocation(data: Path, env: dict[str, str], urls: list[str]) -> dict[str, Any]:
    key = keys(data, env, "create", "--name", "to-revoke")
    auth = {"Authorization": f"Bearer {key['key']}"}
    before = [httpx.post(f"{u}/v1/embeddings", json=BODY, headers=auth, timeout=30).status_code for u in urls]
    keys(data, env, "revoke", key["id"])
    revoked_at = time.monotonic()
    refused_after: dict[str, float | None] = {}
    for url in urls:
        refused_after[url] = None
        while time.monotonic() - revoked_at < 10:
            if httpx.post(f"{url}/v1/embeddings", json=BODY, headers=auth, timeout=30).status_code == 401:
                refused_after[url] = round(time.monotonic() - revoked_at, 3)
                break
            time.sleep(0.02)
    return {"before": before, "refused_after_s": list(refused_after.values())}


def crash(data: Path, env: dict[str, str], urls: list[str], head: LocalRay) -> dict[str, Any]:
    key = keys(data, env, "create", "--name", "usage")
    auth = {"Authorization": f"Bearer {key['key']}", "Cache-Control": "no-cache"}
    answered = 0
    for i in range(30):
        r = httpx.post(f"{urls[i % 2]}/v1/embeddings", json={**BODY, "input": f"usage {i}"}, headers=auth, timeout=30)
        answered += r.status_code == 200
    replicas = [p for p in head.processes() if "ServeReplica" in " ".join(p.cmdline()) and "Edge" in " ".join(p.cmdline())]
    for p in replicas[:1]:
        p.kill()  # SIGKILL right after answering: what it had not flushed is only in its journal
    time.sleep(3)
    deadline = time.monotonic() + 30
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = keys(data, env, "usage", "--key", key["id"])
        if sum(r["requests"] for r in rows) >= answered:
            break
        time.sleep(1)
    return {"answered": answered, "killed": len(replicas[:1]), "usage_requests": sum(r["requests"] for r in rows),
            "usage_tokens": sum(r["tokens"] for r in rows)}


def main() -> None:
    require_own_home()  # run by its test (run_scenario gives it an empty HOME), never in the user's
    data = Path(tempfile.mkdtemp(prefix="gazsi-up2-"))
    proxy, gw = free_port(), free_port()
    env = dict(os.environ, GAZSI_GATEWAY__PORT=str(gw), GAZSI_ENGINE__ONNX_THREADS="1")
    result: dict[str, Any] = {}
    head = LocalRay.for_data_dir(data)
    try:
        up = subprocess.run([*BASE, "up", "--edges", "2", "--data-dir", str(data), "--port", str(proxy),
                             "--timeout", "500"], capture_output=True, text=True, env=env, timeout=600)
        result.update(up_rc=up.returncode, up_out=up.stdout[-3000:] + up.stderr[-3000:])
        if up.returncode == 0:
            admin = re.search(r"export GAZSI_API_KEY=(\S+)", up.stdout).group(1)  # type: ignore[union-attr]
            urls = edge_urls(f"http://127.0.0.1:{gw}", admin, want=2)
            result["edges"] = len(urls)
            if len(urls) == 2:
                limited = keys(data, env, "create", "--name", "limited", "--rpm", str(RPM))
                result["limit"] = asyncio.run(hammer(urls, limited["key"], total=3 * RPM))
                result["revocation"] = revocation(data, env, urls)
                result["crash"] = crash(data, env, urls, head)
    finally:
        down = subprocess.run([*BASE, "down", "--data-dir", str(data)], capture_output=True, text=True, env=env,
                              timeout=180)
        result["down_rc"] = down.returncode
    print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
