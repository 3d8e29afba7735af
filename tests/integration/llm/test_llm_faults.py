"""Faults on the LLM path with a hand-written upstream (tests/support/fake_llm.py) beside a real llama.cpp one.

Edge X relays model ``tiny-f`` to the fake upstream, edge Y to a real llama.cpp server; one gateway has
both. A failure before the first byte (refused connection, 503, no first byte in time) is retried on
the other node; a failure after it (the upstream dies or stalls mid-stream) ends the stream with an SSE
error event and is never retried; a client that leaves cancels the upstream at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio

from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.gateway import DirectGateway, Gateway, create_gateway_app
from gazsi_cluster.http.listener import HttpListener, bind_socket
from gazsi_cluster.routing import NodeEntry
from tests.integration.llm.conftest import gateway_for
from tests.support.asgi import serve_on_loopback
from tests.support.edge import running_node
from tests.support.fake_llm import FakeUpstream
from tests.support.llm_server import LlamaServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

HI = [{"role": "user", "content": "hello"}]
STREAM = {"model": "tiny-f", "messages": HI, "max_tokens": 4, "stream": True}


@dataclass
class Pair:
    fake: FakeUpstream
    x: EdgeNode  # -> fake upstream
    y: EdgeNode  # -> llama.cpp
    gateway: Gateway
    url: str
    direct_url: str  # the gateway's direct listener (DirectGateway on HttpListener)


def _data(text: str) -> list[str]:
    return [line[5:].strip() for line in text.replace("\r\n", "\n").split("\n") if line.startswith("data:")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pair(llama_servers: tuple[LlamaServer, LlamaServer], tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[Pair]:
    real = llama_servers[0]
    llm = {"first_byte_timeout_s": 1.0, "chunk_timeout_s": 1.0}
    async with FakeUpstream() as fake, \
            running_node(tmp_path_factory.mktemp("x"), engine=FakeEngine(), dataplane="auto", llm=llm,
                         edge={"models": [{"name": "tiny-f", "url": fake.url}]}) as x, \
            running_node(tmp_path_factory.mktemp("y"), engine=FakeEngine(), dataplane="auto", llm=llm,
                         edge={"models": [{"name": "tiny-f", "url": real.url, "upstream_model": "tiny-a"}]}) as y:
        gateway = gateway_for(tmp_path_factory.mktemp("gw"), [NodeEntry("x", x.url, models=("tiny-f",)),
                                                                NodeEntry("y", y.url, models=("tiny-f",))],
                              llm={"first_byte_timeout_s": 10.0, "chunk_timeout_s": 10.0})
        gateway.routing.quarantine_s = 0.0  # every request may pick the faulty node again
        listener = HttpListener(DirectGateway(gateway, create_gateway_app(gateway)).handle, gateway.settings.limits)
        sock = bind_socket("127.0.0.1", 0)
        direct_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        await listener.start(sock)
        try:
            async with serve_on_loopback(create_gateway_app(gateway)) as url:
                yield Pair(fake, x, y, gateway, url, direct_url)
        finally:
            await listener.stop(5)
            await gateway.aclose()


def _served(edge: EdgeNode) -> float:
    total = 0.0
    for metric in edge.llm.metrics.requests.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


@pytest.mark.parametrize("mode", ["refuse", "http503", "http429", "stall_first"])
@pytest.mark.parametrize("entry", ["app", "direct"])
async def test_failure_before_the_first_byte_is_retried_on_the_other_node(pair: Pair, mode: str, entry: str) -> None:
    pair.fake.mode, pair.fake.hits = mode, 0
    async with httpx.AsyncClient(base_url=pair.url if entry == "app" else pair.direct_url, timeout=30) as c:
        for _ in range(12):
            for body in (STREAM, {**STREAM, "stream": False}):
                r = await c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, (mode, r.text)
                if body["stream"]:
                    assert _data(r.text)[-1] == "[DONE]", (mode, r.text[-300:])
                else:
                    assert r.json()["object"] == "chat.completion"
            if pair.fake.hits >= 2:
                break
    assert pair.fake.hits >= 2, "the faulty node was never picked"


@pytest.mark.parametrize("entry", ["app", "direct"])
async def test_upstream_dying_mid_stream_ends_with_an_error_event_and_is_not_retried(pair: Pair, entry: str) -> None:
    pair.fake.mode, pair.fake.hits = "die_mid", 0
    async with httpx.AsyncClient(base_url=pair.url if entry == "app" else pair.direct_url, timeout=30) as c:
        for _ in range(20):
            served_y = _served(pair.y)
            r = await c.post("/v1/chat/completions", json=STREAM)
            assert r.status_code == 200
            if pair.fake.hits:
                break
    assert pair.fake.hits == 1
    assert _served(pair.y) == served_y  # the broken stream was not started again on the other node
    data = _data(r.text)
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:2]] == ["one", "two"]
    assert "[DONE]" not in data
    err = json.loads(data[-1])["error"]
    assert err["type"] == "server_error" and err["code"] == "upstream_error" and "127.0.0.1" not in err["message"]


async def test_upstream_stalling_mid_stream_ends_with_a_timeout_event(pair: Pair) -> None:
    pair.fake.mode = "stall_mid"
    async with httpx.AsyncClient(base_url=pair.x.url, timeout=30) as c:
        started = asyncio.get_running_loop().time()
        r = await c.post("/v1/chat/completions", json=STREAM)
        took = asyncio.get_running_loop().time() - started
    assert r.status_code == 200 and 0.9 < took < 5
    data = _data(r.text)
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "one"
    assert json.loads(data[-1])["error"]["code"] == "upstream_timeout"


async def test_no_first_byte_in_time_is_504_on_the_edge(pair: Pair) -> None:
    pair.fake.mode = "stall_first"
    async with httpx.AsyncClient(base_url=pair.x.url, timeout=30) as c:
        for body in (STREAM, {**STREAM, "stream": False}):
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
    # The backend's refusals in the one error shape: its 5xx and a misconfigured node's 404 are the node's
    # failure (502), its 429 is overload (a gateway tries another node), 422/400 are the client's.
    for mode, status, code in [("http503", 502, "upstream_error"), ("http404", 502, "upstream_error"),
                               ("http429", 429, "overloaded"), ("http422", 400, "invalid_request")]:
        pair.fake.mode = mode
        async with httpx.AsyncClient(base_url=pair.x.url, timeout=30) as c:
            r = await c.post("/v1/chat/completions", json=STREAM)
            err = r.json()["error"]
            assert (r.status_code, err["code"]) == (status, code), (mode, r.text)
            if status == 400:
                assert "fake refusal" in err["message"]
    assert pair.x.llm.in_flight == 0


async def test_client_leaving_cancels_the_upstream_at_once(pair: Pair) -> None:
    """Through gateway and edge: the fake upstream sees its connection closed long before any timeout."""
    pair.fake.mode = "stall_mid"
    pair.x.llm.cfg = pair.x.llm.cfg.model_copy(update={"chunk_timeout_s": 30.0})
    try:
        for url in (pair.x.url, pair.url, pair.direct_url):
            pair.fake.closed.clear()
            pair.fake.hits = 0
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                for _ in range(20):  # through the gateway: until the request lands on the fake's edge
                    async with c.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                        assert r.status_code == 200
                        async for _chunk in r.aiter_raw():
                            break
                    if pair.fake.hits:
                        break
            assert pair.fake.hits == 1
            left = asyncio.get_running_loop().time()
            await asyncio.wait_for(pair.fake.closed.wait(), 3)
            assert asyncio.get_running_loop().time() - left < 3
            for _ in range(100):
                if pair.x.llm.in_flight == 0:
                    break
                await asyncio.sleep(0.02)
            assert pair.x.llm.in_flight == 0
    finally:
        pair.x.llm.cfg = pair.x.llm.cfg.model_copy(update={"chunk_timeout_s": 1.0})


async def test_a_slow_client_slows_the_upstream_instead_of_growing_a_buffer(pair: Pair) -> None:
    """The fake upstream floods 64 KB chunks; the client reads one and pauses: what the upstream could send
    stops at what the sockets on the way hold (kernel buffers), far below what it wanted to send."""
    pair.fake.mode, pair.fake.sent = "flood", 0
    pair.x.llm.cfg = pair.x.llm.cfg.model_copy(update={"chunk_timeout_s": 30.0})
    try:
        async with httpx.AsyncClient(base_url=pair.x.url, timeout=30) as c, \
                c.stream("POST", "/v1/chat/completions", json=STREAM) as r:
            assert r.status_code == 200
            async for _chunk in r.aiter_raw():
                break
            await asyncio.sleep(2.0)
            first = pair.fake.sent
            await asyncio.sleep(1.0)
            print(f"upstream sent {first} bytes before the paused client stopped it")
            assert pair.fake.sent == first, "the upstream kept sending to a client that does not read"
            assert first < 128 * 2**20, first  # of the 512 MB it would send; loopback buffers allow tens of MB
    finally:
        pair.x.llm.cfg = pair.x.llm.cfg.model_copy(update={"chunk_timeout_s": 1.0})
    for _ in range(100):
        if pair.x.llm.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert pair.x.llm.in_flight == 0


async def test_usage_is_asked_for_read_and_shown_only_to_a_client_that_asked(pair: Pair) -> None:
    """An upstream that reports usage in streams (vLLM, llama.cpp's server): the edge adds
    stream_options.include_usage, reads the usage chunk, and withholds it from a client that did not ask."""
    pair.fake.mode = "ok"
    tokens = pair.x.llm.metrics.tokens
    before = (tokens.labels("tiny-f", "prompt")._value.get(), tokens.labels("tiny-f", "completion")._value.get())
    async with httpx.AsyncClient(base_url=pair.x.url, timeout=30) as c:
        plain = _data((await c.post("/v1/chat/completions", json=STREAM)).text)
        assert pair.fake.bodies[-1]["stream_options"] == {"include_usage": True}
        asked = _data((await c.post("/v1/chat/completions",
                                    json={**STREAM, "stream_options": {"include_usage": True}})).text)
    assert plain[-1] == asked[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in plain[:-1])
    assert json.loads(asked[-2])["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    after = (tokens.labels("tiny-f", "prompt")._value.get(), tokens.labels("tiny-f", "completion")._value.get())
    assert (after[0] - before[0], after[1] - before[1]) == (6, 4)  # the upstream's numbers, twice
