"""What the CDN adds on the LLM streaming path (issue 16): time to first token and tokens/s, straight to a
llama.cpp server vs through an edge vs through gateway + edge, same server, same prompts.

Processes: ``python -m llama_cpp.server`` over the tests' tiny random-weight GGUF (tests/support/llm_server.py),
``gazsi edge serve --dataplane asgi --backend fake --llm tiny=URL`` (the fake embedding engine: the edge's
embedding side is idle here), and the gateway with a fixed routing table to that edge, once as the FastAPI
app on uvicorn (Serve's proxy path) and once as the direct listener (``DirectGateway``). The client streams
``/v1/chat/completions`` one request at a time (greedy, ``max_tokens`` fixed), the paths interleaved request
by request so drift hits them alike, and measures from its own clock:

    ttft     request sent -> first content chunk read
    tok/s    (content chunks - 1) / (last chunk - first chunk): the decode rate as the client sees it

    python3 benchmarks/llm_overhead_bench.py --requests 200 --max-tokens 32 --out /tmp/llmbench

llama.cpp reuses the longest prefix of the previous prompt it evaluated: a path that sends the prompt the
previous path just sent skips its prompt evaluation (~0.8 ms of TTFT on this model and machine), which made
every relayed path look that much faster than the straight one. So before each measured request one
unmeasured request with an unrelated prompt goes straight to the server (``--fresh``, the default), and
every path starts from the same cache state. ``--tree DIR`` runs the edge and the gateways from another
checkout (the same client and server code measuring both: before/after comparisons).

``--soak-s N`` then runs N seconds of mixed traffic through the gateway's direct listener (8 clients: whole
and streamed answers, clients leaving after the first chunk, unknown models, malformed bodies) and records
the edge's and the gateway's resident memory every 5 s, to show that nothing grows with the traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_direct_bench import serve_gateway  # noqa: E402  (the same gateway variants)

MODEL = "tiny"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, limit_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not up after {limit_s}s")


async def _one(client: Any, url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0.0, "seed": 1}
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    buf = b""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.status_code
        async for chunk in r.aiter_raw():
            buf += chunk
            while b"\n\n" in buf.replace(b"\r\n", b"\n"):
                norm = buf.replace(b"\r\n", b"\n")
                event, _, rest = norm.partition(b"\n\n")
                buf = rest
                data = event[5:].strip() if event.startswith(b"data:") else b""
                if not data or data == b"[DONE]":
                    continue
                delta = json.loads(data)["choices"][0].get("delta", {})
                if "content" in delta:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
    return {"ttft_ms": (first - start) * 1e3, "total_ms": (time.perf_counter() - start) * 1e3, "tokens": tokens,
            "tok_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _soak(url: str, seconds: float, pids: dict[str, int], max_tokens: int) -> dict[str, Any]:
    """Mixed traffic for ``seconds``; returns status counts and RSS samples (kB) per process."""
    import httpx

    counts: dict[str, int] = {}
    errors: list[str] = []
    samples: dict[str, list[int]] = {name: [] for name in pids}
    stop = time.monotonic() + seconds
    msgs = [{"role": "user", "content": "soak"}]

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as c:
            n = 0
            while time.monotonic() < stop:
                n += 1
                kind = ("stream", "whole", "leave", "unknown", "malformed")[(i + n) % 5]
                body: Any = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, "stream": kind != "whole"}
                if kind == "unknown":
                    body["model"] = "no-such-model"
                if kind == "malformed":
                    body = {"model": MODEL, "messages": "not a list"}
                got = b""
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for chunk in r.aiter_raw():
                        if kind == "leave":
                            break
                        got = (got + chunk)[-300:]  # an answer's last bytes: a stream's error event is its end
                key = f"{kind}:{r.status_code}"
                counts[key] = counts.get(key, 0) + 1
                if r.status_code >= 500 and len(errors) < 5:
                    errors.append(f"{key} {got!r}")

    async def sampler() -> None:
        while time.monotonic() < stop:
            for name, pid in pids.items():
                samples[name].append(_rss_kb(pid))
            await asyncio.sleep(5)

    await asyncio.gather(sampler(), *(client(i) for i in range(8)))
    for name, pid in pids.items():
        samples[name].append(_rss_kb(pid))
    return {"seconds": seconds, "answers": dict(sorted(counts.items())), "first_5xx": errors, "rss_kb": samples}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def _run(paths: dict[str, str], requests: int, max_tokens: int, warmup: int, fresh: bool = True
               ) -> dict[str, Any]:
    import httpx

    prompts = [f"prompt {i}: tell me about the number {i * 7919 % 1000}" for i in range(requests)]
    out: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        for i in range(warmup):
            for url in paths.values():
                await _one(client, url, f"warm {i}", max_tokens)
        for prompt in prompts:
            for name, url in paths.items():
                if fresh:  # no path may find its prompt in llama.cpp's prefix cache (see the module docstring)
                    await _one(client, paths["direct"], "zz unrelated", 1)
                out[name].append(await _one(client, url, prompt, max_tokens))
    summary: dict[str, Any] = {}
    base = out["direct"]
    for name, rows in out.items():
        ttft = [r["ttft_ms"] for r in rows]
        summary[name] = {
            "ttft_p50_ms": round(_pct(ttft, 0.5), 3), "ttft_p95_ms": round(_pct(ttft, 0.95), 3),
            "total_p50_ms": round(_pct([r["total_ms"] for r in rows], 0.5), 3),
            "tok_s_mean": round(statistics.fmean(r["tok_s"] for r in rows), 1),
            "tokens_mean": round(statistics.fmean(r["tokens"] for r in rows), 1),
            # Per prompt, this path's TTFT minus the straight path's for the same prompt: the added latency.
            "added_ttft_p50_ms": round(_pct([r["ttft_ms"] - b["ttft_ms"] for r, b in zip(rows, base, strict=True)],
                                            0.5), 3),
        }
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--soak-s", type=float, default=0.0, help="then this many seconds of mixed traffic (RSS)")
    p.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                   help="an unmeasured unrelated prompt before each measured request (llama.cpp's prefix cache)")
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout the edge and the gateways run from")
    p.add_argument("--serve-gateway", nargs=3, metavar=("VARIANT", "EDGE_URL", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_gateway:
        variant, edge_url, port = args.serve_gateway
        serve_gateway(variant, edge_url, int(port), model=MODEL)
        return
    from tests.support.llm_server import LlamaServer, write_tiny_gguf

    work = Path(tempfile.mkdtemp(prefix="gazsi-llm-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    server = LlamaServer(write_tiny_gguf(work / "tiny.gguf", seed=1), MODEL, log=work / "llama.log")
    try:
        # cwd too: ``python -m`` puts the working directory first on sys.path.
        tree = args.tree.resolve()
        env = {**os.environ, "PYTHONPATH": str(tree), "GAZSI_LOG_LEVEL": "warning"}
        edge_port = _port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve", "--dataplane", "asgi",
             "--backend", "fake", "--no-auth", "--port", str(edge_port), "--data-dir", str(work / "edge"),
             "--llm", f"{MODEL}={server.url}"], env=env, cwd=tree, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT))
        edge_url = f"http://127.0.0.1:{edge_port}"
        _wait(edge_url + "/readyz")
        paths = {"direct": server.url, "edge": edge_url}
        for variant in ("fastapi", "direct_listener"):
            port = _port()
            procs.append(subprocess.Popen([sys.executable, str(tree / "benchmarks" / Path(__file__).name),
                                           "--serve-gateway", variant, edge_url, str(port)],
                                          env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            _wait(f"http://127.0.0.1:{port}/healthz")
            paths[f"gateway_{variant}+edge"] = f"http://127.0.0.1:{port}"
        summary = asyncio.run(_run(paths, args.requests, args.max_tokens, args.warmup, args.fresh))
        result: dict[str, Any] = {"requests": args.requests, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
                                  "fresh": args.fresh, "tree": str(tree), "paths": summary}
        if args.soak_s > 0:
            pids = {"edge": procs[0].pid, "gateway_direct_listener": procs[2].pid}
            result["soak"] = asyncio.run(_soak(paths["gateway_direct_listener+edge"], args.soak_s, pids,
                                               args.max_tokens))
        print(json.dumps(result, indent=2))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "llm_overhead.json").write_text(json.dumps(result, indent=2))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()


if __name__ == "__main__":
    main()
