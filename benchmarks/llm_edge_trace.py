"""Where an edge's added time to first token goes: timestamps at the steps of one streamed request (issue 16).

Starts the tests' llama.cpp server and one ``gazsi edge serve --dataplane asgi --llm tiny=URL`` whose
functions on the request's path are wrapped to stamp ``time.perf_counter_ns`` (the edge runs this file
with ``--serve``: the wrapping happens in the edge's own process, the code measured is the tree's).
The client sends, one at a time, an unrelated prompt straight to the server (llama.cpp's prefix cache,
see llm_overhead_bench.py), the prompt straight, the same unrelated prompt, the prompt through the edge;
then prints the client's TTFT on both paths and, per step, the median time since the request's first
bytes reached the edge.

    python3 benchmarks/llm_edge_trace.py --requests 200 [--tree /path/to/other/checkout]

Concurrency 1 only (one request's stamps at a time). Steps missing in a tree (its upstream client is not
aiohttp) are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _serve(out: Path, argv: list[str]) -> int:
    """In the edge's process: wrap the path's steps, then run the CLI."""
    import uvicorn.protocols.http.httptools_impl as uv

    import edge_node.llm as llm
    import edge_node.pipeline as pipeline
    import edge_node.transports.asgi as asgi
    import gazsi_cluster.http.hardening as hardening

    cur: dict[str, int] = {}
    done: list[dict[str, int]] = []
    now = time.perf_counter_ns

    def mark(label: str) -> None:
        if cur and label not in cur:
            cur[label] = now()

    def wrap_sync(cls: Any, name: str, before: Any) -> None:
        orig = getattr(cls, name)

        def wrapper(self: Any, *a: Any) -> Any:
            before(*a)
            return orig(self, *a)
        setattr(cls, name, wrapper)

    def request_bytes(data: bytes) -> None:
        if b"POST /v1/chat/completions" in data:
            if "8_content_written" in cur:
                done.append(dict(cur))
                if len(done) % 20 == 0:
                    out.write_text(json.dumps(done))
            cur.clear()
            cur["0_request_bytes_in"] = now()

    wrap_sync(hardening.HardenedProtocol, "data_received", request_bytes)
    wrap_sync(hardening.HardenedProtocol, "on_message_complete", lambda: mark("1_request_complete"))
    try:
        import aiohttp.client as aiohttp_client
        import aiohttp.client_proto as aiohttp_proto

        def upstream_bytes(data: bytes) -> None:
            mark("5_upstream_head_in")
            if b'"content"' in data:
                mark("7_upstream_content_in")
        wrap_sync(aiohttp_proto.ResponseHandler, "data_received", upstream_bytes)
        orig_request = aiohttp_client.ClientSession._request

        async def request(self: Any, *a: Any, **k: Any) -> Any:
            mark("4_upstream_request")
            return await orig_request(self, *a, **k)
        setattr(aiohttp_client.ClientSession, "_request", request)  # noqa: B010
    except ImportError:
        pass
    orig_rud = getattr(asgi, "run_until_disconnect")  # noqa: B009

    async def run_until_disconnect(request: Any, work: Any) -> Any:
        mark("2_endpoint_has_body")
        return await orig_rud(request, work)
    setattr(asgi, "run_until_disconnect", run_until_disconnect)  # noqa: B010
    orig_handle = pipeline.EdgePipeline.handle

    async def handle(self: Any, request: Any) -> Any:
        mark("3_pipeline")
        return await orig_handle(self, request)
    setattr(pipeline.EdgePipeline, "handle", handle)  # noqa: B010
    orig_open = getattr(llm, "open_upstream")  # noqa: B009  (imported there, not exported)

    async def open_upstream(*a: Any, **k: Any) -> Any:
        up = await orig_open(*a, **k)
        mark("6_upstream_first_chunk_read")
        return up
    setattr(llm, "open_upstream", open_upstream)  # noqa: B010
    orig_send = uv.RequestResponseCycle.send

    async def send(self: Any, message: Any) -> None:
        if message.get("type") == "http.response.start":
            mark("6b_reply_head_sent")
        if b'"content"' in message.get("body", b""):
            mark("8_content_sent")
            await orig_send(self, message)
            mark("8_content_written")
            return
        await orig_send(self, message)
    setattr(uv.RequestResponseCycle, "send", send)  # noqa: B010

    from gazsi_cli.main import main
    return main(argv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout the edge runs from")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.serve:
        sys.exit(_serve(args.serve, rest))
    sys.path.insert(0, str(ROOT))
    import httpx

    from benchmarks.llm_overhead_bench import _one, _port, _wait
    from tests.support.llm_server import LlamaServer, write_tiny_gguf

    work = Path(tempfile.mkdtemp(prefix="gazsi-llm-trace-"))
    server = LlamaServer(write_tiny_gguf(work / "tiny.gguf", seed=1), "tiny", log=work / "llama.log")
    trace, port, tree = work / "trace.json", _port(), args.tree.resolve()
    edge = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(trace), "--log-level", "warning", "edge",
         "serve", "--dataplane", "asgi", "--backend", "fake", "--no-auth", "--port", str(port), "--data-dir",
         str(work / "edge"), "--llm", f"tiny={server.url}"],
        env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    edge_url = f"http://127.0.0.1:{port}"

    async def run() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        straight, relayed = [], []
        async with httpx.AsyncClient(timeout=60, trust_env=False) as c:
            for i in range(10):
                await _one(c, edge_url, f"warm {i}", args.max_tokens)
            for i in range(args.requests):
                prompt = f"prompt {i}: tell me about the number {i * 7919 % 1000}"
                await _one(c, server.url, "zz unrelated", 1)
                straight.append(await _one(c, server.url, prompt, args.max_tokens))
                await _one(c, server.url, "zz unrelated", 1)
                relayed.append(await _one(c, edge_url, prompt, args.max_tokens))
        return straight, relayed

    try:
        _wait(edge_url + "/readyz")
        straight, relayed = asyncio.run(run())
        time.sleep(0.5)
    finally:
        edge.terminate()
        edge.wait(10)
        server.stop()
    rows = json.loads(trace.read_text())
    result: dict[str, Any] = {
        "tree": str(tree), "requests": args.requests,
        "client_ttft_p50_ms": {"straight": round(statistics.median(r["ttft_ms"] for r in straight), 3),
                               "edge": round(statistics.median(r["ttft_ms"] for r in relayed), 3)},
        "added_ttft_p50_ms": round(statistics.median(b["ttft_ms"] - a["ttft_ms"]
                                                     for a, b in zip(straight, relayed, strict=True)), 3),
        "edge_steps_p50_ms_since_request_bytes": {
            k: round(statistics.median((r[k] - r["0_request_bytes_in"]) / 1e6 for r in rows if k in r), 3)
            for k in sorted({k for r in rows for k in r})},
        "traced_requests": len(rows),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
