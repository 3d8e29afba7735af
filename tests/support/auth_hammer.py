"""One process of a multi-process auth hammer: it builds its own ``KeyAuthorizer`` from settings
(as every edge process does), optionally on a node's shared limits table, warms its key cache,
prints ``ready`` and waits for a start time on stdin (so a slow start on a loaded machine costs
no accuracy), then runs the pipeline's auth calls (authorize → reserve_tokens → record_usage) on
one key as fast as it can for a while and prints what it was allowed as one JSON line.

    python -m tests.support.auth_hammer '{"data_dir": …, "key": …, "seconds": 3}'   # then "START_AT\\n"

Config keys: data_dir, key, seconds, redis_url (optional), database_url (optional), table (a
SharedBuckets name, optional), tokens ([lo, hi]: tokens per request; omit for requests only), seed.
:func:`run_hammers` starts several and runs them together.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from gazsi_cluster.auth.factory import attach_node_limits, build_authorizer
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import RateLimited

ROOT = Path(__file__).resolve().parents[2]


async def hammer(cfg: dict[str, Any]) -> dict[str, Any]:
    settings = load_settings(data_dir=cfg["data_dir"], auth={
        "redis_url": cfg.get("redis_url"), "database_url": cfg.get("database_url"), "key_env": "test",
        "usage_flush_interval_s": 0.5,
    })
    table = attach_node_limits(cfg["table"]) if cfg.get("table") else None
    auth = build_authorizer(settings, limiter=table)
    await auth.start()
    rng = random.Random(cfg.get("seed", 0))
    lo, hi = cfg.get("tokens") or (0, 0)
    header = f"Bearer {cfg['key']}"
    out: dict[str, Any] = {"ok": 0, "limited": 0, "tokens": 0, "quota_refusals": 0}
    try:
        # Warm the key cache; the bucket refills to full while the others start.
        await auth.authorize(header, model="m")
        print("ready", flush=True)
        start_at = float(await asyncio.to_thread(sys.stdin.readline))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        out["late_s"] = max(0.0, time.time() - start_at)
        end = start_at + cfg["seconds"]
        while time.time() < end:
            try:
                principal = await auth.authorize(header, model="m")
                tokens = rng.randint(lo, hi) if hi else 0
                if tokens:
                    await auth.reserve_tokens(principal, model="m", tokens=tokens)
                await auth.record_usage(principal, model="m", tokens=tokens, reserved=tokens)
                out["ok"] += 1
                out["tokens"] += tokens
            except RateLimited as exc:
                out["limited"] += 1
                out["quota_refusals"] += exc.code == "insufficient_quota"
    finally:
        await auth.close()
        if table is not None:
            table.close()
    return out


async def run_hammers(configs: list[dict[str, Any]], *, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Start one process per config, wait until all are ready, start them together; their results."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.auth_hammer", json.dumps(cfg), cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for cfg in configs
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), timeout_s)
            if line.strip() != b"ready":
                err = await p.stderr.read() if p.stderr else b""
                raise RuntimeError(f"hammer did not start: {line!r} {err.decode()[-3000:]}")
        start_at = time.time() + 0.3
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{start_at}\n".encode())
            await p.stdin.drain()
        results = []
        for p in procs:
            out, err = await asyncio.wait_for(p.communicate(), timeout_s)
            if p.returncode != 0:
                raise RuntimeError(err.decode()[-3000:])
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(hammer(json.loads(sys.argv[1])))), flush=True)
