"""The relay's upstream client against a loopback aiohttp server: what it sends, keeps and closes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from gazsi_cluster.config import LlmConfig
from gazsi_cluster.errors import UpstreamError
from gazsi_cluster.llm import open_upstream, upstream_client

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


class _Server:
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.stream_closed = asyncio.Event()
        self.url = ""

    async def whole(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        response = web.json_response({"ok": True})
        response.set_cookie("session", "from-the-upstream")
        return response

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        try:
            while True:  # an upstream still generating
                await asyncio.sleep(0.01)
                await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed.set()
            raise

    async def cut(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {}\n\n")
        assert request.transport is not None
        request.transport.close()  # dies mid-stream: the chunked body never ends
        return response


@pytest_asyncio.fixture
async def server() -> AsyncIterator[_Server]:
    s = _Server()
    app = web.Application()
    app.router.add_post("/whole", s.whole)
    app.router.add_post("/stream", s.stream)
    app.router.add_post("/cut", s.cut)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    s.url = f"http://127.0.0.1:{port}"
    try:
        yield s
    finally:
        await runner.cleanup()


async def test_no_cookies_carried_and_no_compression_asked(server: _Server) -> None:
    cfg = LlmConfig()
    client = upstream_client(cfg)
    try:
        for _ in range(2):
            up = await open_upstream(client, server.url + "/whole", b"{}", {"content-type": "application/json"}, cfg)
            assert up.whole and up.status == 200 and up.first == b'{"ok": true}'
            await up.aclose()
    finally:
        await client.close()
    assert "Cookie" not in server.seen[1]  # one client's cookie never reaches the next client's request
    assert "Accept-Encoding" not in server.seen[0]


async def test_a_stream_left_unread_closes_its_connection_at_once(server: _Server) -> None:
    cfg = LlmConfig()
    client = upstream_client(cfg)
    try:
        up = await open_upstream(client, server.url + "/stream", b"{}", {}, cfg)
        assert not up.whole and up.is_event_stream and up.first.startswith(b"data:")
        await up.aclose()  # the client left
        await asyncio.wait_for(server.stream_closed.wait(), 5)
    finally:
        await client.close()


async def test_an_upstream_dying_mid_stream_is_an_upstream_error(server: _Server) -> None:
    cfg = LlmConfig()
    client = upstream_client(cfg)
    try:
        up = await open_upstream(client, server.url + "/cut", b"{}", {}, cfg)
        with pytest.raises(UpstreamError):
            async for _chunk in up.chunks(5.0):
                pass
    finally:
        await client.close()
