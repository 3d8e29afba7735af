"""``gazsi bench``: a load generator (closed loop at a concurrency, or open loop at a rate)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="load-test an edge node or gateway")
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=["embeddings", "inference"], default="embeddings")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--inputs", type=int, default=1, help="inputs per request")
    p.add_argument("--long", action="store_true", help="~128-token inputs instead of short sentences")
    p.add_argument("-c", "--concurrency", type=int, default=32, help="closed loop: requests in flight")
    p.add_argument("-r", "--rate", type=float, help="open loop: requests per second (overrides -c)")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds run before measuring")
    p.add_argument("--api-key", help="bearer key (env GAZSI_API_KEY)")
    p.add_argument("--json", type=Path, help="write the result as JSON here")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    import os

    from gazsi_cluster.bench import LoadSpec, run_load

    spec = LoadSpec(
        url=args.url.rstrip("/"), endpoint=args.endpoint, model=args.model, inputs_per_request=args.inputs,
        long_inputs=args.long, concurrency=args.concurrency, rate=args.rate, duration_s=args.duration,
        warmup_s=args.warmup, api_key=args.api_key or os.environ.get("GAZSI_API_KEY"),
    )
    result = asyncio.run(run_load(spec))
    print(result.summary())
    if args.json:
        args.json.write_text(result.to_json())
    return 0 if result.ok else 1
