"""Where one low-load request's time goes in the fast front (issue 8, round 2: the p50 <= 1 ms goal).

Starts an edge node with the fast front in this process (its event loop in a thread; workers are
processes of their own), sends
``--requests`` single-input ``POST /v1/embeddings`` one at a time on one keep-alive connection
(concurrency 1: the lowest load there is), and after each reply reads the per-stage timestamps
the worker and the engine wrote into the request's ring slot (``time.monotonic_ns``, one clock
for every process on the host). Prints the p50/p90 of each stage in microseconds:

    python3 benchmarks/fast_stages.py --config cfg.yaml --requests 3000

Stages: client send -> worker submit (HTTP parse, JSON, validation, tokenise, slot write) ->
engine read (pipe wakeup) -> batch formed -> inference start (gather + pad) -> inference end
(engine: H2D, graph replay, D2H) -> reply written (scatter) -> worker woken (pipe wakeup) ->
client has the body (JSON encode, socket write, client read).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncio  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from benchmarks.loadgen import SENTENCES  # noqa: E402
from edge_node.node import EdgeNode  # noqa: E402
from edge_node.transports.fast.ring import (  # noqa: E402
    M_T_FORMED,
    M_T_INFER0,
    M_T_INFER1,
    M_T_READ,
    M_T_REPLY,
    M_T_SUBMIT,
    M_T_WOKEN,
)
from gazsi_cluster.config import Settings, load_settings  # noqa: E402

STAGES = [("parse+tokenise", None, M_T_SUBMIT), ("pipe to engine", M_T_SUBMIT, M_T_READ),
          ("form batch", M_T_READ, M_T_FORMED), ("gather+pad", M_T_FORMED, M_T_INFER0),
          ("engine", M_T_INFER0, M_T_INFER1), ("scatter", M_T_INFER1, M_T_REPLY),
          ("pipe to worker", M_T_REPLY, M_T_WOKEN), ("respond", M_T_WOKEN, None)]


@contextmanager
def running_node(settings: Settings) -> Iterator[EdgeNode]:
    """The node under its lifespan on an event loop of its own (this thread stays a plain blocking client)."""
    started = threading.Event()
    holder: dict[str, object] = {}
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        async with EdgeNode(settings) as node:
            holder["node"] = node
            holder["stop"] = stop = asyncio.Event()
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # start-up failed: say so to the waiting thread
            holder["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="edge-node", daemon=True)
    thread.start()
    started.wait(300)
    if "error" in holder or "node" not in holder:
        raise RuntimeError(f"the edge node did not start: {holder.get('error')!r}")
    try:
        yield holder["node"]  # type: ignore[misc]
    finally:
        stop = holder["stop"]
        loop.call_soon_threadsafe(stop.set)  # type: ignore[attr-defined]
        thread.join(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = load_settings(args.config)
    with running_node(settings) as node:
        conn = http.client.HTTPConnection(settings.edge.host, node.port, timeout=10)
        deadline = time.monotonic() + 240
        while True:  # ready: the engine loaded and captured its graphs
            try:
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                conn.request("POST", "/v1/embeddings", body=json.dumps({"input": "warm up", "model": settings.engine.model}),
                             headers={"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    break
            except OSError:
                conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError("fast front not ready")
            time.sleep(0.5)
        ring = getattr(node.transport, "ring", None)
        if ring is None:
            raise RuntimeError(f"the node runs the {node.dataplane} data plane: this script measures the fast front")
        rng = random.Random(1)
        rows: list[list[int]] = []
        for i in range(args.requests + 200):
            body = json.dumps({"input": f"{rng.choice(SENTENCES)} {i}", "model": settings.engine.model})
            t_send = time.monotonic_ns()
            conn.request("POST", "/v1/embeddings", body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            t_recv = time.monotonic_ns()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
            slot = int(np.argmax(ring.meta[:, M_T_WOKEN]))  # one request at a time: the newest slot is ours
            if i >= 200:  # the first ones warm caches and branch predictors
                rows.append([t_send, *(int(ring.meta[slot, w]) for w in (M_T_SUBMIT, M_T_READ, M_T_FORMED,
                             M_T_INFER0, M_T_INFER1, M_T_REPLY, M_T_WOKEN)), t_recv])
        conn.close()
    a = np.array(rows, dtype=np.int64)
    cols = {None: 0, M_T_SUBMIT: 1, M_T_READ: 2, M_T_FORMED: 3, M_T_INFER0: 4, M_T_INFER1: 5, M_T_REPLY: 6,
            M_T_WOKEN: 7}
    out = {}
    print(f"{len(a)} sequential requests; stage p50 / p90 in microseconds")
    for name, start, end in STAGES:
        d = (a[:, cols[end] if end is not None else 8] - a[:, cols[start]]) / 1e3
        out[name] = {"p50": float(np.percentile(d, 50)), "p90": float(np.percentile(d, 90))}
        print(f"  {name:16s} {out[name]['p50']:8.1f} {out[name]['p90']:8.1f}")
    total = (a[:, 8] - a[:, 0]) / 1e3
    out["total"] = {"p50": float(np.percentile(total, 50)), "p90": float(np.percentile(total, 90)),
                    "p99": float(np.percentile(total, 99))}
    print(f"  {'total':16s} {out['total']['p50']:8.1f} {out['total']['p90']:8.1f} (p99 {out['total']['p99']:.1f})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
