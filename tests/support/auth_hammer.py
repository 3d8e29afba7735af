"""One process of a multi-process auth hammer: it builds its own ``KeyAuthorizer`` from settings
(as every edge process does), optionally on a node's shared limits table, waits for a common
start time, then runs the pipeline's auth calls (authorize → reserve_tokens → record_usage) on
one key as fast as it can for a while and prints what it was allowed as one JSON line.

    python -m tests.support.auth_hammer '{"data_dir": …, "key": …, "start_at": …, "seconds": 3}'

Config keys: data_dir, key, start_at (epoch s), seconds, redis_url (optional), database_url
(optional), table (a SharedBuckets name, optional), tokens ([lo, hi]: tokens per request; omit
for requests only), seed.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

from gazsi_cluster.auth.factory import attach_node_limits, build_authorizer
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import RateLimited


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
    out = {"ok": 0, "limited": 0, "tokens": 0, "quota_refusals": 0, "writer": ""}
    try:
        # Warm the key cache before the clock starts; the bucket refills to full while we wait.
        await auth.authorize(header, model="m")
        await asyncio.sleep(max(0.0, cfg["start_at"] - time.time()))
        end = cfg["start_at"] + cfg["seconds"]
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
        out["writer"] = auth.usage.journal.writer if auth.usage.journal else ""
        await auth.close()
        if table is not None:
            table.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(hammer(json.loads(sys.argv[1])))), flush=True)
