"""The reverse tunnel's wire (HTTP/2 with roles reversed) on a loopback TCP pair, without TLS.

Flow control (a body many windows long), the stream bound, cancellation reaching the edge's work, a
stream stalled mid-response, a peer that stops answering PINGs, and the gateway's table view.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gazsi_cluster.errors import DeadlineExceeded, Overloaded, TunnelClosed
from gazsi_cluster.routing import NodeEntry, RoutingTable
from gazsi_cluster.tunnel import Handler, TunnelConnection, TunnelHub

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@asynccontextmanager
async def pair(handler: Handler, **kw: float) -> AsyncIterator[tuple[TunnelConnection, TunnelConnection]]:
    """(gateway end, edge end): the edge dials, then serves; the gateway accepts, then requests."""
    accepted: asyncio.Future[TunnelConnection] = asyncio.get_running_loop().create_future()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = TunnelConnection(reader, writer, client_side=True, name="gw", **kw)  # type: ignore[arg-type]
        await conn.start()
        accepted.set_result(conn)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    edge = TunnelConnection(reader, writer, client_side=False, name="edge", handler=handler, **kw)  # type: ignore[arg-type]
    await edge.start()
    gateway = await asyncio.wait_for(accepted, 5)
    try:
        yield gateway, edge
    finally:
        await gateway.aclose()
        await edge.aclose()
        server.close()


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_bodies_many_windows_long_pass_both_ways() -> None:
    async def echo(method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        size = len(body).to_bytes(8, "big")
        return 200, [("content-type", "application/octet-stream"), ("x-path", path)], _chunks(size, body[::-1])

    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB: eight times the per-stream window
    async with pair(echo) as (gateway, _edge):
        results = await asyncio.gather(*(gateway.request("POST", f"/echo/{i}", [], payload, 20) for i in range(3)))
    for i, (status, headers, body) in enumerate(results):
        assert status == 200 and dict(headers)["x-path"] == f"/echo/{i}"
        assert int.from_bytes(body[:8], "big") == len(payload) and body[8:] == payload[::-1]


async def test_the_stream_bound_refuses_at_once_and_frees_on_completion() -> None:
    release = asyncio.Event()

    async def slow(method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        await release.wait()
        return 200, [], _chunks(b"ok")

    async with pair(slow, max_streams=2) as (gateway, _edge):
        held = [asyncio.create_task(gateway.request("GET", "/", [], b"", 10)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded):
            await gateway.request("GET", "/", [], b"", 10)
        release.set()
        assert [r[2] for r in await asyncio.gather(*held)] == [b"ok", b"ok"]
        assert (await gateway.request("GET", "/", [], b"", 10))[2] == b"ok"


async def test_a_cancelled_request_cancels_the_edges_work() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 200, [], _chunks()

    async with pair(forever) as (gateway, edge):
        task = asyncio.create_task(gateway.request("GET", "/", [], b"", 30))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        await asyncio.wait_for(cancelled.wait(), 2)  # RST_STREAM reached the edge and stopped the work
        await asyncio.sleep(0.05)
        assert gateway.open_streams == 0 and edge.open_streams == 0


async def test_a_stream_stalled_mid_response_times_out_and_the_tunnel_lives_on() -> None:
    async def stalls(method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        async def parts() -> AsyncIterator[bytes]:
            yield b'{"partial": '
            if path == "/stall":
                await asyncio.sleep(60)
            yield b"1}"
        return 200, [], parts()

    async with pair(stalls) as (gateway, _edge):
        with pytest.raises(DeadlineExceeded):
            await gateway.request("GET", "/stall", [], b"", 0.5)
        assert (await gateway.request("GET", "/fine", [], b"", 5))[2] == b'{"partial": 1}'


async def test_a_peer_that_stops_answering_pings_is_closed() -> None:
    # A "frozen" edge: TCP accepted, nothing ever sent back (no SETTINGS, no PING ACK).
    frozen: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frozen.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    conn = TunnelConnection(reader, writer, client_side=True, name="gw", ping_interval_s=0.1, ping_timeout_s=0.4)
    await conn.start()
    await asyncio.wait_for(conn.closed.wait(), 3)
    assert "PING" in conn.close_reason
    with pytest.raises(TunnelClosed):
        await conn.request("GET", "/", [], b"", 1)
    server.close()


def test_the_gateway_view_hides_tunnelled_nodes_without_a_tunnel() -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED
    hub = TunnelHub(ctx)
    table = RoutingTable(3, 2, (NodeEntry("d1", "http://10.0.0.1:8000"), NodeEntry("t1", "tunnel://t1")))
    view = hub.view(lambda: table)
    assert [n.node_id for n in view().nodes] == ["d1"]
    hub.tunnels["t1"] = object()  # type: ignore[assignment]
    hub.generation += 1
    seen = view()
    assert [n.node_id for n in seen.nodes] == ["d1", "t1"] and seen.membership_version != table.membership_version
    assert view() is seen  # cached per (table, generation): no rebuild per request
    with pytest.raises(ValueError, match="CERT_REQUIRED"):
        TunnelHub(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))


async def test_route_never_hands_a_client_a_node_behind_a_tunnel(tmp_path) -> None:
    import httpx

    from gazsi_cluster.auth import AllowAll
    from gazsi_cluster.config import load_settings
    from gazsi_cluster.gateway import Gateway, create_gateway_app

    table = RoutingTable(3, 2, (NodeEntry("d1", "http://10.0.0.1:8000"), NodeEntry("t1", "tunnel://t1")))
    gateway = Gateway(load_settings(data_dir=str(tmp_path), auth={"enabled": False}), authorizer=AllowAll(),
                      table=lambda: table)
    transport = httpx.ASGITransport(app=create_gateway_app(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        urls = {(await http.get("/v1/route")).json()["url"] for _ in range(20)}
    assert urls == {"http://10.0.0.1:8000"}  # the tunnelled node is reachable only through the gateway
    await gateway.aclose()
