"""Chat and completions through edge and gateway against real llama.cpp servers (issue 16).

Two edges (ONNX CPU embeddings plus one llama.cpp model each: ``tiny-a`` behind keys, ``tiny-b`` open)
behind one gateway app on loopback: streaming and not, the official ``openai`` client, both models,
unknown model, malformed bodies, keys/limits/usage, a client leaving after the first chunk, metrics, and
embeddings on the same nodes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.integration.llm.conftest import EMBED, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

HI = [{"role": "user", "content": "hello"}]


def events(text: str) -> list[Any]:
    """The data payloads of an SSE body ([DONE] as the string)."""
    out: list[Any] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data:"):
                data = line[5:].strip()
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_chat_whole_and_streamed_through_edge_and_gateway(cluster: Cluster) -> None:
    for url in (cluster.edge_a.url, cluster.gateway_url):
        async with cluster.client(url) as c:
            r = await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI, "max_tokens": 6})
            assert r.status_code == 200, (url, r.text)
            body = r.json()
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
            assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] > 0
            r = await c.post("/v1/chat/completions",
                             json={"model": "tiny-a", "messages": HI, "max_tokens": 6, "stream": True})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), url
            got = events(r.text)
            assert got[-1] == "[DONE]"
            chunks = [e for e in got[:-1] if e["choices"] and "content" in e["choices"][0]["delta"]]
            assert len(chunks) == 6 and all(e["object"] == "chat.completion.chunk" for e in got[:-1])
            # The usage chunk the edge asked for on the client's behalf is not shown to a client that did not ask.
            assert all(e.get("usage") is None for e in got[:-1])
            r = await c.post("/v1/completions", json={"model": "tiny-a", "prompt": "once upon", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


async def test_openai_client_streams_both_models_through_one_gateway(cluster: Cluster) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=cluster.gateway_url + "/v1", api_key=cluster.key, max_retries=0, timeout=30)
    try:
        listed = {m.id async for m in client.models.list()}
        assert {"tiny-a", "tiny-b", EMBED} <= listed
        for model in ("tiny-a", "tiny-b"):
            stream = await client.chat.completions.create(model=model, messages=HI, max_tokens=5, stream=True)
            parts = [chunk async for chunk in stream]
            assert parts and all(p.model == model for p in parts)
            assert sum(1 for p in parts if p.choices and p.choices[0].delta.content is not None) == 5
            assert parts[-1].choices[0].finish_reason == "length"
        # The client's own stream_options pass through (llama-cpp-python 0.3.36 ignores include_usage).
        stream = await client.chat.completions.create(model="tiny-b", messages=HI, max_tokens=3, stream=True,
                                                      stream_options={"include_usage": True})
        assert [chunk async for chunk in stream][-1].choices[-1].finish_reason == "length"
        # Embeddings keep working on the same nodes, through the same gateway and client.
        vec = await client.embeddings.create(model=EMBED, input=["hello", "world"])
        assert len(vec.data) == 2 and len(vec.data[0].embedding) == 384
    finally:
        await client.close()


async def test_unknown_model_and_malformed_bodies(cluster: Cluster) -> None:
    bad: list[tuple[dict[str, Any] | bytes, int, str | None]] = [
        ({"model": "no-such-model", "messages": HI}, 404, "model"),
        ({"model": "tiny-a"}, 400, "messages"),
        ({"model": "tiny-a", "messages": []}, 400, "messages"),
        ({"model": "tiny-a", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ({"model": "tiny-a", "messages": [{"content": "x"}]}, 400, "messages"),
        ({"model": "tiny-a", "messages": "hello"}, 400, "messages"),
        ({"model": "tiny-a", "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny-a", "messages": HI, "n": 0}, 400, "n"),
        ({"model": "tiny-a", "messages": HI, "n": 1000}, 400, "n"),
        ({"model": "tiny-a", "messages": HI, "stream": "yes"}, 400, "stream"),
        (b"{not json", 400, None),
    ]
    for url in (cluster.edge_a.url, cluster.gateway_url):
        async with cluster.client(url) as c:
            for body, status, param in bad:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = await c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
                assert r.status_code == status, (url, body, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (url, body, err)
                if status == 404:
                    assert err["code"] == "model_not_found"
            # An embedding model is not a chat model, and a chat model is not an embedding one.
            r = await c.post("/v1/chat/completions", json={"model": EMBED, "messages": HI})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    async with cluster.client(cluster.edge_b.url) as c:  # tiny-a lives on the other edge only
        r = await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_keys_limits_and_usage_on_chat(cluster: Cluster) -> None:
    admin = cluster.authorizer.admin
    for url in (cluster.edge_a.url, cluster.gateway_url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI, "max_tokens": 2})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI, "stream": True},
                             headers={"authorization": "Bearer gz_test_" + "A" * 43})
            assert r.status_code == 401
    limited = await admin.create(name="chat-rpm", rpm=2)
    async with httpx.AsyncClient(base_url=cluster.gateway_url, timeout=30,
                                 headers={"authorization": f"Bearer {limited.key}"}) as c:
        codes = [(await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI, "max_tokens": 2,
                                                              "stream": i == 1})).status_code for i in range(3)]
        assert codes == [200, 200, 429]
    # Tokens per minute: a max_tokens beyond the key's whole budget is refused before it reaches llama.cpp.
    tpm = await admin.create(name="chat-tpm", tpm=50)
    async with httpx.AsyncClient(base_url=cluster.edge_a.url, timeout=30,
                                 headers={"authorization": f"Bearer {tpm.key}"}) as c:
        before = cluster.edge_a.llm.metrics.requests.labels("tiny-a", "/v1/chat/completions", "200")._value.get()
        r = await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI, "max_tokens": 500})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        after = cluster.edge_a.llm.metrics.requests.labels("tiny-a", "/v1/chat/completions", "200")._value.get()
        assert after == before
    # Usage: prompt + completion tokens of a whole answer, completion chunks of a stream, under the key.
    user = await admin.create(name="chat-usage")
    async with httpx.AsyncClient(base_url=cluster.gateway_url, timeout=30,
                                 headers={"authorization": f"Bearer {user.key}"}) as c:
        whole = (await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI, "max_tokens": 4}))
        assert whole.status_code == 200
        streamed = await c.post("/v1/chat/completions",
                                json={"model": "tiny-a", "messages": HI, "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200
    await cluster.authorizer.usage.flush()
    rows = [r for r in await admin.usage(ident=user.record.id) if r.model == "tiny-a"]
    assert sum(r.requests for r in rows) == 2
    assert sum(r.tokens for r in rows) == whole.json()["usage"]["total_tokens"] + 3


async def test_client_leaving_after_the_first_chunk_cancels_the_upstream(cluster: Cluster) -> None:
    edge = cluster.edge_b
    disconnects = edge.llm.metrics.stream_errors.labels("tiny-b", "disconnect")
    before = disconnects._value.get()
    async with cluster.client() as c:
        async with c.stream("POST", "/v1/chat/completions",
                            json={"model": "tiny-b", "messages": HI, "max_tokens": 450, "stream": True}) as r:
            assert r.status_code == 200
            async for _ in r.aiter_raw():
                break  # the first chunk, then leave
    for _ in range(250):  # the edge notices within a poll of its watcher; 5 s is a generous bound
        if not edge.llm.in_flight:
            break
        await asyncio.sleep(0.02)
    assert edge.llm.in_flight == 0
    assert disconnects._value.get() == before + 1  # cut short, not run to [DONE]
    # The node and its llama.cpp server serve the next request as usual.
    async with cluster.client() as c:
        r = await c.post("/v1/chat/completions", json={"model": "tiny-b", "messages": HI, "max_tokens": 2})
        assert r.status_code == 200


async def test_llm_metrics_and_heartbeat_models(cluster: Cluster) -> None:
    async with cluster.client(cluster.edge_a.url) as c:
        r = await c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HI, "max_tokens": 5,
                                                        "stream": True})
        assert r.status_code == 200
        text = (await c.get("/metrics")).text
    for name in ("gazsi_llm_time_to_first_token_seconds_count", "gazsi_llm_inter_token_latency_seconds_count",
                 "gazsi_llm_tokens_per_second_count", 'gazsi_llm_tokens_total{kind="completion",model="tiny-a"}'):
        assert name in text, name
    assert 'gazsi_requests_total{route="/v1/chat/completions",status="200"}' in text
    facts = cluster.edge_a.facts()
    assert facts.models == [EMBED, "tiny-a"]
    assert cluster.edge_a.dataplane == "asgi" and "edge.models" in cluster.edge_a.dataplane_reason
