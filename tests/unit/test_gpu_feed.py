"""The host socket feed's framing, and its connection rules over a real loopback socket (no GPU)."""

from __future__ import annotations

import asyncio

import pytest

from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu.cpu_path import error_response
from edge_node.transports.gpu.feed import FeedConnection, FeedLimits, HeadFramer
from gazsi_cluster.config import LimitsConfig
from gazsi_cluster.errors import Overloaded, RequestTimeout
from gazsi_cluster.http.errors import error_reply
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
        # A slow client that never finishes its head is cut off with the listeners' 408.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /slow HTTP/1.1\r\nHost:")
        assert await asyncio.wait_for(r.read(), 5) == render(error_reply(RequestTimeout(
            "request headers were not received in time")), keep_alive=False)
        w.close()
        # So is one that sends nothing at all.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 408")
        w.close()
    finally:
        server.close()
        await server.wait_closed()


def test_limits_come_from_the_listener_config() -> None:
    cfg = LimitsConfig(max_header_bytes=4096, max_headers=20, header_timeout_s=3, keep_alive_timeout_s=7,
                       body_timeout_s=9, max_connections_per_client=5)
    lim = FeedLimits.from_config(cfg)
    assert (lim.header_timeout_s, lim.keepalive_timeout_s, lim.body_timeout_s) == (3, 7, 9)
    assert lim.max_connections_per_client == 5 and lim.max_headers == 20 and lim.max_header_bytes == 4096
    # The head may carry the request line's method and version beyond the listener's count; the
    # buffer holds a head in service and the next one being framed, no more (reading pauses beyond).
    assert 4096 < lim.max_head <= 4096 + 128 and lim.max_buffer == 2 * lim.max_head
    assert lim.headers_too_large().message == "request headers exceed the limit (20 fields, 4096 bytes)"


def test_bare_line_feed_is_handed_on_at_once() -> None:
    f = HeadFramer()
    f.feed(b"GET / HTTP/1.1\nHost: h")
    assert f.next_head() == (b"GET / HTTP/1.1\n", False)  # no terminator will ever make it valid
    f2 = HeadFramer()
    f2.feed(b"GET / HTTP/1.1\r")
    assert f2.next_head() is None  # a CR at the end of what arrived may still be a CRLF


@pytest.mark.timeout(20)
async def test_body_is_read_across_chunks_and_pipelining_resumes() -> None:
    got: list[bytes] = []

    class Sink:
        def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
            got.append(head)
            if head.startswith(b"POST"):
                async def answer() -> None:
                    body = await conn.read_body(10)
                    conn.respond(render(HttpReply(200, body), keep_alive=True), True)
                asyncio.get_running_loop().create_task(answer())
            else:
                conn.respond(render(HttpReply(200, b"get"), keep_alive=False), False)

    server = await asyncio.get_running_loop().create_server(lambda: FeedConnection(Sink()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
        await asyncio.sleep(0.05)
        w.write(b"56789GET /b HTTP/1.1\r\n\r\n")
        data = await asyncio.wait_for(r.read(), 5)
        assert data.endswith(b"0123456789" + render(HttpReply(200, b"get"), keep_alive=False))
        assert [h.split(b" ")[1] for h in got] == [b"/a", b"/b"]
        w.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(20)
async def test_a_body_larger_than_the_buffer_is_read_although_reading_paused() -> None:
    # The head and a body far over max_buffer arrive before the data plane asks for the body: reading
    # pauses on the full buffer, and asking for the body must resume it (else the body times out).
    size = 200_000
    limits = FeedLimits(max_head=1024, max_buffer=2048, body_timeout_s=2)

    class Sink:
        def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
            async def answer() -> None:
                await asyncio.sleep(0.2)  # the CPU parse is late: the bytes are all there
                body = await conn.read_body(size)
                conn.respond(render(HttpReply(200, b"%d %d" % (len(body), body.count(b"x"))), keep_alive=False),
                             False)
            asyncio.get_running_loop().create_task(answer())

    server = await asyncio.get_running_loop().create_server(lambda: FeedConnection(Sink(), limits), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
        data = await asyncio.wait_for(r.read(), 10)
        assert data == render(HttpReply(200, b"%d %d" % (size, size)), keep_alive=False)
        w.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(30)
async def test_no_next_head_while_the_client_leaves_its_answers_unread() -> None:
    # Bounded pipelining: a client that pipelines and does not read gets no more requests served than
    # its socket buffers hold answers for; once it reads, the rest are served, in order.
    big = b"y" * (8 << 20)
    heads: list[bytes] = []

    class Sink:
        def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
            heads.append(head)
            conn.respond(render(HttpReply(200, big), keep_alive=True), True)

    server = await asyncio.get_running_loop().create_server(lambda: FeedConnection(Sink()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        n = 6
        w.write(b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(n)))
        await asyncio.sleep(0.5)
        assert 1 <= len(heads) < n, len(heads)  # the first answers fill the buffers; the others wait
        answer = render(HttpReply(200, big), keep_alive=True)
        assert await asyncio.wait_for(r.readexactly(n * len(answer)), 10) == answer * n
        assert [h.split(b" ")[1] for h in heads] == [b"/%d" % i for i in range(n)]
        w.close()
    finally:
        server.close()
        await server.wait_closed()
