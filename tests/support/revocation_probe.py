"""A serving process that watches for revocations: it builds its own ``KeyAuthorizer`` (as an edge
process does), authorises every given key once (they are now in its in-process cache), prints
``ready``, then keeps authorising the keys still accepted and, when all were refused (or after
``timeout``), prints one JSON line ``{key: epoch seconds of the first refusal}``.

    python -m tests.support.revocation_probe '{"data_dir": …, "keys": [...], "redis_url": null}'
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import AuthenticationError


async def probe(cfg: dict[str, Any]) -> dict[str, float]:
    auth_cfg = {"redis_url": cfg.get("redis_url"), "database_url": cfg.get("database_url"), "key_env": "test",
                **cfg.get("auth", {})}
    auth = build_authorizer(load_settings(data_dir=cfg["data_dir"], auth=auth_cfg))
    await auth.start()
    refused: dict[str, float] = {}
    try:
        for key in cfg["keys"]:
            await auth.authorize(f"Bearer {key}")
        if auth.tier is not None:
            await asyncio.wait_for(auth.subscribed.wait(), 10)
        if auth.watcher is not None:
            await asyncio.wait_for(auth.watching.wait(), 10)
        print("ready", flush=True)
        deadline = time.time() + cfg.get("timeout", 60)
        pending = list(cfg["keys"])
        while pending and time.time() < deadline:
            for key in list(pending):
                try:
                    await auth.authorize(f"Bearer {key}")
                except AuthenticationError:
                    refused[key] = time.time()
                    pending.remove(key)
            await asyncio.sleep(cfg.get("every_s", 0.002))
    finally:
        await auth.close()
    return refused


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(json.loads(sys.argv[1])))), flush=True)
