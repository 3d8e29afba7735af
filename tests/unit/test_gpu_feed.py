"""The host socket feed's framing, and its connection rules over a real loopback socket (no GPU)."""

from __future__ import annotations

import asyncio

import pytest

from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu.feed import FeedConnection, FeedLimits, HeadFramer
from edge_node.transports.gpu.server import error_response
from gazsi_cluster.errors import Overloaded
from gazsi_cluster.http.wire import HttpReply, render

pytestmark = pytest.mark.unit


def test_heads_split_across_chunks_and_pipelined() -> None:
    f = HeadFramer()
    stream = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    for i in range(0, len(stream), 5):
        f.feed(stream[i:i + 5])
    assert f.next_head() == (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n", False)
    assert f.next_head() == (b"GET /b HTTP/1.1\r\n\r\n", False)
    assert f.next_head() is None and f.buffered == 0


def test_oversized_head_is_cut_at_the_stride() -> None:
    f = HeadFramer()
    f.feed(b"GET /" + b"a" * (L.REQ_STRIDE - 6))
    assert f.next_head() is None  # one byte short of the stride: still waiting
    f2 = HeadFramer()
    f2.feed(b"GET /" + b"a" * (L.REQ_STRIDE + 100))
    got = f2.next_head()
    assert got is not None and got[1] is True and len(got[0]) == L.REQ_STRIDE
    # A terminator beyond the stride does not count: the head is too large either way.
    f3 = HeadFramer()
    f3.feed(b"G" * (L.REQ_STRIDE - 2) + b"\r\n\r\n")
    got3 = f3.next_head()
    assert got3 is not None and got3[1] is True


def test_body_is_skipped_buffered_or_still_to_come() -> None:
    f = HeadFramer()
    f.feed(b"GET /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123")
    assert f.next_head() is not None
    f.skip(10)
    assert f.buffered == 0
    f.feed(b"456789GET /b HTTP/1.1\r\n\r\n")
    assert f.next_head() == (b"GET /b HTTP/1.1\r\n\r\n", False)


def test_cpu_error_response_is_well_formed() -> None:
    import h11

    raw = error_response(Overloaded("busy", retry_after=2), keep_alive=True)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    conn.receive_data(raw)
    head = conn.next_event()
    assert isinstance(head, h11.Response) and head.status_code == 429
    assert dict(head.headers)[b"retry-after"] == b"2"
    body = conn.next_event()
    assert isinstance(body, h11.Data) and b'"code":"overloaded"' in body.data
    assert render(HttpReply(404, b"{}"), keep_alive=False).endswith(b"connection: close\r\n\r\n{}")


class _EchoSink:
    """Answers each head with its length; records what it got."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
        self.heads.append(head)
        keep = b"close" not in head
        body = str(len(head)).encode()
        asyncio.get_running_loop().call_soon(conn.respond, render(HttpReply(200, body), keep_alive=keep), keep)


@pytest.mark.timeout(20)
async def test_feed_over_loopback_keepalive_pipelining_and_slow_client() -> None:
    sink = _EchoSink()
    limits = FeedLimits(header_timeout_s=0.3, keepalive_timeout_s=5)
    server = await asyncio.get_running_loop().create_server(lambda: FeedConnection(sink, limits), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /a HTTP/1.1\r\n\r\nGET /bb HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(r.read(), 5)  # read() to EOF: the last one closes
        assert data.count(b"HTTP/1.1 200") == 3
        assert [h.split(b" ")[1] for h in sink.heads] == [b"/a", b"/bb", b"/c"]  # in order
        w.close()
        # A slow client that never finishes its head is cut off.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /slow HTTP/1.1\r\nHost:")
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
    finally:
        server.close()
        await server.wait_closed()
