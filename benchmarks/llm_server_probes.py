"""Two facts about the tests' llama.cpp server that llm_overhead_bench.py's numbers depend on (issue 16).

``prefix``: llama.cpp reuses the longest prefix of the prompt it evaluated last, so the same prompt sent
twice in a row reaches its first token sooner the second time (why the bench's ``--fresh`` exists).
``usage``: asking for ``stream_options.include_usage`` (the edge does, to record usage) costs the server
nothing before the first token. Straight to the server, no CDN process; 200 prompts, concurrency 1.

    python3 benchmarks/llm_server_probes.py --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.llm_overhead_bench import _one  # noqa: E402


async def _aiohttp_ttft(session: object, url: str, prompt: str, usage: bool) -> float:
    body: dict[str, object] = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
                               "stream": True, "temperature": 0.0, "seed": 1}
    if usage:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=json.dumps(body).encode(),  # type: ignore[attr-defined]
                            headers={"content-type": "application/json"}) as r:
        seen = b""
        async for chunk in r.content.iter_any():
            seen += chunk
            if b'"content"' in seen:
                return (time.perf_counter() - start) * 1e3
    raise RuntimeError("no content chunk")


async def _probe(url: str, requests: int) -> dict[str, float]:
    import aiohttp
    import httpx

    new, again, without, with_usage = [], [], [], []
    async with httpx.AsyncClient(timeout=60, trust_env=False) as c, aiohttp.ClientSession() as s:
        for i in range(10):
            await _one(c, url, f"warm {i}", 32)
        for i in range(requests):
            prompt = f"prompt {i}: tell me about the number {i * 7919 % 1000}"
            new.append((await _one(c, url, prompt, 32))["ttft_ms"])
            again.append((await _one(c, url, prompt, 32))["ttft_ms"])
            await _one(c, url, "zz unrelated", 1)
            without.append(await _aiohttp_ttft(s, url, prompt, False))
            await _one(c, url, "zz unrelated", 1)
            with_usage.append(await _aiohttp_ttft(s, url, prompt, True))
    return {
        "prefix_new_prompt_ttft_p50_ms": round(statistics.median(new), 3),
        "prefix_same_prompt_again_ttft_p50_ms": round(statistics.median(again), 3),
        "prefix_difference_per_prompt_p50_ms": round(statistics.median(a - b for a, b in zip(new, again, strict=True)),
                                                     3),
        "usage_without_ttft_p50_ms": round(statistics.median(without), 3),
        "usage_with_include_usage_ttft_p50_ms": round(statistics.median(with_usage), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    from tests.support.llm_server import LlamaServer, write_tiny_gguf

    work = Path(tempfile.mkdtemp(prefix="gazsi-llm-probe-"))
    server = LlamaServer(write_tiny_gguf(work / "tiny.gguf", seed=1), "tiny", log=work / "llama.log")
    try:
        print(json.dumps(asyncio.run(_probe(server.url, args.requests)), indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
