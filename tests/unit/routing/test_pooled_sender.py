"""The pooled sender (issue 14) against real loopback servers: keep-alive reuse, the per-node bound, waiting
with a deadline, connections the server closes, ``Connection: close``, timeouts, cancellation, and a broken
node turning into a failover through the routing client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gazsi_cluster.routing import NodeEntry, RoutingClient, RoutingMetrics, RoutingTable, make_policy
from gazsi_cluster.routing._pool import PooledSender
from gazsi_cluster.routing._transport import SendError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@dataclass
class Seen:
    """What a loopback server saw: one entry per connection, the requests (head, body) it read on each."""

    conns: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0


# (connection index, request index on that connection, head, body) -> raw answer bytes, or None to hang up.
Answer = Callable[[int, int, bytes, bytes], Awaitable[bytes | None]]


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


@contextlib.asynccontextmanager
async def server(answer: Answer) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(seen.conns)
        seen.conns.append([])
        seen.open_now += 1
        seen.most_open = max(seen.most_open, seen.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                seen.conns[index].append((head, body))
                raw = await answer(index, len(seen.conns[index]) - 1, head, body)
                if raw is None:
                    return
                writer.write(raw)
                await writer.drain()
                if b"connection: close" in raw.lower():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            seen.open_now -= 1
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        srv.close()
        await srv.wait_closed()


def sender(**kw: float) -> PooledSender:
    opts: dict[str, float] = {"timeout_s": 5.0, "connect_timeout_s": 2.0, **kw}
    return PooledSender(**opts)  # type: ignore[arg-type]


async def echo(conn: int, n: int, head: bytes, body: bytes) -> bytes:
    return ok(body, b"X-Echo-Conn: %d\r\n" % conn)


async def test_keep_alive_connections_are_reused_and_the_answer_is_whole() -> None:
    s = sender()
    async with server(echo) as (url, seen):
        try:
            for i in range(20):
                r = await s.send("POST", url + "/v1/embeddings", content=b'{"i":%d}' % i,
                                 headers={"Authorization": "Bearer k", "content-type": "application/json"})
                assert (r.status_code, r.content, r.json()) == (200, b'{"i":%d}' % i, {"i": i})
                assert r.headers["content-type"] == "application/json" and r.headers["x-echo-conn"] == "0"
        finally:
            await s.aclose()
    assert len(seen.conns) == 1 and len(seen.conns[0]) == 20
    head = seen.conns[0][0][0].decode()
    assert head.startswith("POST /v1/embeddings HTTP/1.1\r\n")
    assert f"host: {url[len('http://'):]}" in head and "Authorization: Bearer k" in head


async def test_params_and_json_bodies_are_encoded() -> None:
    s = sender()
    async with server(echo) as (url, seen):
        try:
            r = await s.send("GET", url + "/inference", params={"d": "a b&c"})
            assert r.status_code == 200
            r = await s.send("POST", url + "/x?y=1", json={"a": 1}, params={"d": "é"})
            assert r.json() == {"a": 1}
        finally:
            await s.aclose()
    first, second = seen.conns[0][0][0].decode(), seen.conns[0][1][0].decode("latin-1")
    assert first.startswith("GET /inference?d=a+b%26c HTTP/1.1")
    assert second.startswith("POST /x?y=1&d=%C3%A9 HTTP/1.1") and "content-type: application/json" in second


async def test_connections_per_node_are_bounded_and_requests_wait_for_one() -> None:
    async def slow(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        await asyncio.sleep(0.02)
        return ok(body)

    s = sender(max_connections=3, max_connecting=2)
    async with server(slow) as (url, seen):
        try:
            answers = await asyncio.gather(*(s.send("POST", url + "/", content=b"%d" % i) for i in range(30)))
        finally:
            await s.aclose()
    assert [a.content for a in answers] == [b"%d" % i for i in range(30)]
    assert len(seen.conns) <= 3 and seen.most_open <= 3
    assert sum(len(c) for c in seen.conns) == 30


async def test_a_request_that_finds_no_free_connection_before_its_deadline_is_a_send_error() -> None:
    s = sender(max_connections=1, timeout_s=0.3)
    async with server(echo) as (url, seen):
        try:
            pool = s.pool(url)
            held = await pool.acquire(asyncio.get_running_loop().time() + 60)  # the node's only connection
            with pytest.raises(SendError, match="PoolTimeout"):
                await s.send("POST", url + "/", content=b"1")
            pool.release(held)
            r = await s.send("POST", url + "/", content=b"2")  # free again: taken, not a new dial
        finally:
            await s.aclose()
    assert r.content == b"2" and len(seen.conns) == 1


async def test_a_timed_out_connection_is_not_reused() -> None:
    async def first_hangs(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        if conn == 0:
            await asyncio.sleep(10)
        return ok(b"late" if conn == 0 else b"fresh")

    s = sender(timeout_s=0.2)
    async with server(first_hangs) as (url, seen):
        try:
            with pytest.raises(SendError, match="TimeoutError"):
                await s.send("POST", url + "/", content=b"x")
            r = await s.send("POST", url + "/", content=b"y")
        finally:
            await s.aclose()
    assert r.content == b"fresh" and len(seen.conns) == 2


async def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    async def close_after_each(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        return ok(b"%d" % conn)  # answered; the handler below then hangs up without saying so

    async def answer(conn: int, n: int, head: bytes, body: bytes) -> bytes | None:
        return None if n >= 1 else await close_after_each(conn, n, head, body)

    s = sender()
    async with server(answer) as (url, seen):
        try:
            # Every connection answers one request, then closes when the next one arrives (the race of an
            # edge closing an idle keep-alive connection just as it is taken): sent again on a new one.
            bodies = [(await s.send("POST", url + "/", content=b"q")).content for _ in range(4)]
        finally:
            await s.aclose()
    assert bodies == [b"0", b"1", b"2", b"3"]
    assert [len(c) for c in seen.conns] == [2, 2, 2, 1]


async def test_when_every_idle_connection_is_stale_the_one_more_try_uses_a_new_connection() -> None:
    """A node that closed all its keep-alive connections (a restart, a shutdown) leaves several stale idle
    ones: the request goes out once more on a new connection, not on the next stale one (which ended the
    send with neither an answer nor a SendError, and the failover test lost requests under load)."""
    async def answer(conn: int, n: int, head: bytes, body: bytes) -> bytes | None:
        return None if conn < 3 and n >= 1 else ok(b"%d" % conn)

    s = sender()
    async with server(answer) as (url, seen):
        try:
            # Three connections at once, each answering its first request: three idle connections.
            first = await asyncio.gather(*(s.send("POST", url + "/", content=b"q") for _ in range(3)))
            assert sorted(r.content for r in first) == [b"0", b"1", b"2"]
            # Each of them now hangs up on its next request: one stale try, then a new connection answers.
            again = await s.send("POST", url + "/", content=b"q")
        finally:
            await s.aclose()
    assert again.content == b"3"
    assert len(seen.conns) == 4


async def test_a_fresh_connection_that_fails_is_not_sent_again() -> None:
    async def hang_up(conn: int, n: int, head: bytes, body: bytes) -> bytes | None:
        return None

    s = sender()
    async with server(hang_up) as (url, seen):
        try:
            with pytest.raises(SendError, match="ServerDisconnected"):
                await s.send("POST", url + "/", content=b"q")
        finally:
            await s.aclose()
    assert len(seen.conns) == 1  # not retried: another node should be tried, by the routing client


async def test_an_answer_with_connection_close_is_not_kept() -> None:
    async def closing(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        return ok(b"%d" % conn, b"connection: close\r\n")

    s = sender()
    async with server(closing) as (url, seen):
        try:
            bodies = [(await s.send("POST", url + "/", content=b"q")).content for _ in range(3)]
        finally:
            await s.aclose()
    assert bodies == [b"0", b"1", b"2"] and [len(c) for c in seen.conns] == [1, 1, 1]


async def test_chunked_and_until_close_answers() -> None:
    async def shapes(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        if conn == 0:
            return b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        return b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nuntil the end"

    s = sender()
    async with server(shapes) as (url, _):
        try:
            first = await s.send("POST", url + "/", content=b"q")
            s.pool(url).idle.clear()  # make the next request dial
            second = await s.send("POST", url + "/", content=b"q")
        finally:
            await s.aclose()
    assert (first.status_code, first.content) == (503, b"abcde")
    assert (second.status_code, second.content) == (200, b"until the end")


async def test_a_cancelled_request_frees_its_connection_slot() -> None:
    gate, arrived = asyncio.Event(), asyncio.Event()

    async def slow(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        if conn == 0:
            arrived.set()
            await gate.wait()
        return ok(b"%d" % conn)

    s = sender(max_connections=1)
    async with server(slow) as (url, _):
        try:
            task = asyncio.create_task(s.send("POST", url + "/", content=b"q"))
            await arrived.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            r = await s.send("POST", url + "/", content=b"q")  # the only slot is free again
        finally:
            gate.set()
            await s.aclose()
    assert r.content == b"1"  # on a new connection: the cancelled one may still get an answer


async def test_a_refused_node_is_a_send_error_and_the_routing_client_fails_over() -> None:
    async def good(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        return ok(b'{"from":"good"}')

    async def broken(conn: int, n: int, head: bytes, body: bytes) -> bytes | None:
        return None  # reads the request, hangs up

    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: connections are refused
    try:
        with pytest.raises(SendError, match="ConnectError"):
            await sender().send("POST", refused + "/", content=b"q")
        async with server(good) as (good_url, _), server(broken) as (broken_url, _):
            for bad in (refused, broken_url):
                # wrr alternates between the two nodes: the bad one is picked within two requests.
                table = RoutingTable(1, 1, (NodeEntry("bad", bad), NodeEntry("good", good_url)))
                metrics = RoutingMetrics()
                client = RoutingClient(lambda t=table: t, make_policy("wrr"), attempts=3, metrics=metrics)
                try:
                    answers = [await client.request("POST", "/v1/embeddings", content=b"{}") for _ in range(4)]
                    assert all(a.json() == {"from": "good"} for a in answers)
                    assert client.quarantined() == {"bad"}
                finally:
                    await client.aclose()
    finally:
        sock.close()


def test_a_sender_kept_across_event_loops_starts_afresh_on_the_new_one() -> None:
    async def hangs(conn: int, n: int, head: bytes, body: bytes) -> bytes:
        await asyncio.sleep(10)
        return ok()

    s = sender(timeout_s=0.2)

    async def once() -> None:
        async with server(echo) as (url, _):
            assert (await s.send("POST", url + "/", content=b"a")).content == b"a"
        async with server(hangs) as (url, _):  # the deadline holds on this loop too (its sweep runs here)
            with pytest.raises(SendError, match="TimeoutError"):
                await s.send("POST", url + "/", content=b"b")

    asyncio.run(once())
    asyncio.run(once())
    asyncio.run(s.aclose())
