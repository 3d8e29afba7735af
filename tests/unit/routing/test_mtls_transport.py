"""Gateway → edge mTLS, client side: the routing client's senders (the default pooled one, aiohttp) with
``tls.cluster_client_context`` reaches a server that requires cluster client certificates, and
nothing without one (or with another CA's) gets through. Real TLS on loopback."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gazsi_cluster.errors import ConfigError
from gazsi_cluster.routing._pool import PooledSender
from gazsi_cluster.routing._transport import AiohttpSender, SendError
from gazsi_cluster.tls import CertAuthority, client_context, cluster_client_context, server_context

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.fixture(params=[PooledSender, AiohttpSender], ids=["pooled", "aiohttp"])
def sender_cls(request: pytest.FixtureRequest) -> type[PooledSender | AiohttpSender]:
    cls: type[PooledSender | AiohttpSender] = request.param
    return cls


def write_pair(dir_: Path, name: str, pems: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = dir_ / f"{name}.crt", dir_ / f"{name}.key"
    cert.write_bytes(pems[0])
    key.write_bytes(pems[1])
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca, other = CertAuthority.create("cluster CA"), CertAuthority.create("someone else's CA")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    out = {"ca": tmp_path / "ca.crt"}
    out["server_crt"], out["server_key"] = write_pair(tmp_path, "edge", ca.issue("127.0.0.1", hosts=["127.0.0.1"]))
    out["gw_crt"], out["gw_key"] = write_pair(tmp_path, "gateway", ca.issue("gateway", client=True))
    out["rogue_crt"], out["rogue_key"] = write_pair(tmp_path, "rogue", other.issue("gateway", client=True))
    return out


@pytest.fixture
async def edge(pki: dict[str, Path]) -> AsyncIterator[str]:
    """An HTTPS listener that demands a client certificate from the cluster CA and echoes its CN."""
    ctx = server_context(pki["server_crt"], pki["server_key"], client_ca=pki["ca"], require_client_cert=True)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            peer = writer.get_extra_info("peercert") or {}
            cn = dict(x[0] for x in peer.get("subject", ())).get("commonName", "")
            body = cn.encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}/v1/embeddings"
    finally:
        server.close()
        await server.wait_closed()


async def test_cluster_client_cert_is_accepted_and_identified(pki: dict[str, Path], edge: str,
                                                              sender_cls: type[PooledSender]) -> None:
    sender = sender_cls(timeout_s=5, connect_timeout_s=2,
                           ssl_context=cluster_client_context(pki["ca"], pki["gw_crt"], pki["gw_key"]))
    try:
        r = await sender.send("POST", edge, content=b"{}")
        assert r.status_code == 200 and r.content == b"gateway"  # the edge saw the gateway's certificate
    finally:
        await sender.aclose()


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
async def test_without_a_cluster_certificate_the_edge_refuses(pki: dict[str, Path], edge: str, who: str,
                                                             sender_cls: type[PooledSender]) -> None:
    ctx = (client_context(pki["ca"]) if who == "no certificate"
           else client_context(pki["ca"], certfile=pki["rogue_crt"], keyfile=pki["rogue_key"]))
    sender = sender_cls(timeout_s=5, connect_timeout_s=2, ssl_context=ctx)
    try:
        with pytest.raises(SendError):
            await sender.send("POST", edge, content=b"{}")
    finally:
        await sender.aclose()


async def test_the_gateway_refuses_an_edge_the_cluster_ca_did_not_sign(pki: dict[str, Path], tmp_path: Path,
                                                                    edge: str, sender_cls: type[PooledSender]) -> None:
    # Trusting another CA only: the edge's certificate does not verify, so nothing is sent.
    other = CertAuthority.create("not the cluster")
    (tmp_path / "other.crt").write_bytes(other.cert_pem)
    sender = sender_cls(timeout_s=5, connect_timeout_s=2,
                        ssl_context=cluster_client_context(tmp_path / "other.crt", pki["gw_crt"], pki["gw_key"]))
    try:
        with pytest.raises(SendError):
            await sender.send("POST", edge, content=b"{}")
    finally:
        await sender.aclose()


def test_missing_files_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        cluster_client_context(tmp_path / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key")


async def test_a_slow_tls_handshake_is_bounded_by_the_request_not_the_connect_timeout(pki: dict[str, Path]) -> None:
    """connect_timeout_s is for the TCP connect (a dead node fails over fast); a busy node's TLS handshake may
    take longer and has the request's whole deadline (the full suite's mTLS peer forwarding failed otherwise).
    The pooled sender only: aiohttp's sock_connect bounds its handshake too (this test fails with it)."""
    sender_cls = PooledSender
    ctx = server_context(pki["server_crt"], pki["server_key"], client_ca=pki["ca"], require_client_cert=True)
    loop = asyncio.get_running_loop()
    upgrades: list[asyncio.Task[None]] = []

    class LateTls(asyncio.Protocol):
        """Accepts at once, reads nothing for 0.4 s (the ClientHello waits in the socket), then does TLS."""

        def __init__(self) -> None:
            self.tls: asyncio.BaseTransport | None = None
            self.buf = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.pause_reading()  # type: ignore[attr-defined]
            upgrades.append(asyncio.create_task(self.upgrade(transport)))

        async def upgrade(self, transport: asyncio.BaseTransport) -> None:
            await asyncio.sleep(0.4)
            self.tls = await loop.start_tls(transport, self, ctx, server_side=True)  # type: ignore[arg-type]
            self.answer()  # the request may have come before this coroutine resumed

        def data_received(self, data: bytes) -> None:
            self.buf += data
            self.answer()

        def answer(self) -> None:
            if b"\r\n\r\n" in self.buf and self.tls is not None:
                self.tls.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")  # type: ignore[attr-defined]
                self.tls.close()

    server = await loop.create_server(LateTls, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = sender_cls(timeout_s=5, connect_timeout_s=0.1,
                        ssl_context=cluster_client_context(pki["ca"], pki["gw_crt"], pki["gw_key"]))
    try:
        r = await sender.send("POST", f"https://127.0.0.1:{port}/v1/embeddings", content=b"{}")
        assert r.status_code == 200 and r.content == b"ok"
    finally:
        await sender.aclose()
        server.close()
        await server.wait_closed()
        for task in upgrades:
            task.cancel()
