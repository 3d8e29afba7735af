"""Inside the cluster (issue 18): gateway -> edge traffic is mTLS with the cluster CA.

Real TLS sockets on loopback: an edge (asgi in-process, and the fast front with a worker process)
serves HTTPS with ``edge.tls`` and requires client certificates from the cluster CA; it joins an
in-process control-plane registry, whose routing table the gateway routes over; the gateway's real
aiohttp routing client dials it with ``gateway.edge_tls``. FakeEngine, not ONNX: only the transport
is under test here, and the ONNX engine's answers are covered by the parity tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.registry import Registry
from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import ConfigError
from gazsi_cluster.gateway import Gateway, create_gateway_app
from gazsi_cluster.protocol import NodeLoad
from gazsi_cluster.routing import RoutingTable
from gazsi_cluster.tls import DeploymentCerts, client_context, create_deployment_certs
from tests.support.agents import StaticLink
from tests.support.edge import TRANSPORTS, running_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
MODEL = "all-MiniLM-L6-v2"


def cluster_certs(tmp_path: Path) -> tuple[DeploymentCerts, DeploymentCerts]:
    """The cluster's CA, edge certificate (127.0.0.1), `gateway` and `edge-a` clients; another CA's `gateway`."""
    ours = create_deployment_certs(tmp_path / "tls", hosts=["127.0.0.1"], clients=["gateway", "edge-a"])
    theirs = create_deployment_certs(tmp_path / "other-ca", hosts=["127.0.0.1"], clients=["gateway"])
    return ours, theirs


def edge_tls(certs: DeploymentCerts) -> dict[str, Any]:
    return {"certfile": str(certs.server_cert), "keyfile": str(certs.server_key),
            "client_ca_file": str(certs.ca_cert), "require_client_cert": True}


def routing_table_from_join(node: EdgeNode) -> RoutingTable:
    """The table the control plane builds from what the edge advertises when it joins."""
    registry = Registry(join_token=None)
    rec = registry.join(node.facts(), None)
    registry.heartbeat(rec.node_id, NodeLoad())
    return registry.snapshot()


@asynccontextmanager
async def gateway_client(tmp_path: Path, table: RoutingTable, edge_tls_cfg: dict[str, Any] | None
                         ) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app (real routing client, no injected http) configured with ``gateway.edge_tls``."""
    settings = load_settings(
        data_dir=str(tmp_path), auth={"enabled": False}, gateway={"edge_tls": edge_tls_cfg or {}},
        control_plane={"connect_timeout_s": 2.0, "request_timeout_s": 10.0, "retry_attempts": 1},
    )
    gateway = Gateway(settings, authorizer=AllowAll(), table=lambda: table)
    transport = httpx.ASGITransport(app=create_gateway_app(gateway), raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=20) as client:
            yield client
    finally:
        await gateway.aclose()


def handshake(port: int, ca: Path, cert: tuple[Path, Path] | None, version: ssl.TLSVersion) -> str:
    """Dial the edge trusting the cluster CA, presenting ``cert`` (or none); what the edge does.

    TLS 1.2: the server checks the client's certificate inside the handshake, so a refusal fails it.
    TLS 1.3: it checks it after the client's Finished, so the refusal shows on the first read: an
    alert, or the connection cut without one (asyncio's TLS layer may not flush the alert).
    """
    ctx = client_context(ca, certfile=cert[0] if cert else None, keyfile=cert[1] if cert else None)
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
        except (ssl.SSLError, ConnectionError) as exc:
            return f"refused in the handshake: {getattr(exc, 'reason', None) or type(exc).__name__}"
        with s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
                return f"answered {s.recv(65536)[:12]!r}"
            except (ssl.SSLError, ConnectionError) as exc:
                return f"refused after the handshake: {getattr(exc, 'reason', None) or type(exc).__name__}"


@pytest.mark.parametrize("dataplane", TRANSPORTS)
async def test_gateway_reaches_an_mtls_edge_only_with_a_cluster_certificate(
    tmp_path: Path, dataplane: str, caplog: pytest.LogCaptureFixture,
) -> None:
    certs, other = cluster_certs(tmp_path)
    gw_cert, gw_key = certs.clients["gateway"]
    rogue_cert, rogue_key = other.clients["gateway"]
    engine = FakeEngine()
    async with running_node(tmp_path / "edge", dataplane=dataplane, engine=engine, workers=1,
                            cache={"enabled": False}, edge={"tls": edge_tls(certs)}) as node:
        table = routing_table_from_join(node)
        # An edge serving TLS advertises https, so the control plane's table makes the gateway dial https.
        assert node.facts().scheme == "https"
        assert [n.url for n in table.nodes] == [f"https://127.0.0.1:{node.port}"]
        body = {"model": MODEL, "input": ["through the gateway", "over mTLS"]}

        warmed = len(engine.calls)  # the runtime's warm-up batches
        member = {"ca_file": str(certs.ca_cert), "certfile": str(gw_cert), "keyfile": str(gw_key)}
        async with gateway_client(tmp_path / "gw", table, member) as gw:
            r = await gw.post("/v1/embeddings", json=body)
            assert r.status_code == 200, r.text
            assert [len(d["embedding"]) for d in r.json()["data"]] == [384, 384]
        served = len(engine.calls)
        assert served > warmed  # the request reached the edge's model

        # The same gateway with a `gateway` certificate another CA signed: the edge refuses the handshake.
        caplog.clear()
        rogue = {**member, "certfile": str(rogue_cert), "keyfile": str(rogue_key)}
        with caplog.at_level(logging.INFO, logger="gazsi_cluster.routing.client"):
            async with gateway_client(tmp_path / "gw-rogue", table, rogue) as gw:
                r = await gw.post("/v1/embeddings", json=body)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "no_healthy_node"
        assert "127.0.0.1" not in r.text and r.headers.get("retry-after")  # the edge's address stays inside
        # The attempt failed at the connection (the handshake), not with an HTTP answer from the edge.
        failures = [rec.getMessage() for rec in caplog.records if "failed (" in rec.getMessage()]
        assert failures and all("HTTP " not in m for m in failures), failures

        # Without gateway.edge_tls the gateway does not trust the cluster CA: 503, nothing is sent.
        async with gateway_client(tmp_path / "gw-plain", table, None) as gw:
            r = await gw.post("/v1/embeddings", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_node", r.text

        # Straight at the edge: no certificate, or another CA's, is refused; ours is served (TLS 1.2 and 1.3).
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            for cert in (None, (rogue_cert, rogue_key)):
                said = await asyncio.to_thread(handshake, node.port, certs.ca_cert, cert, version)
                expected = "refused in the handshake" if version is ssl.TLSVersion.TLSv1_2 else "refused"
                assert said.startswith(expected), (version, cert, said)
            said = await asyncio.to_thread(handshake, node.port, certs.ca_cert, (gw_cert, gw_key), version)
            assert said == "answered b'HTTP/1.1 200'", (version, said)
        assert len(engine.calls) == served  # nothing but the member's request reached the model


@pytest.mark.parametrize("dataplane", TRANSPORTS)
@pytest.mark.parametrize("with_peer_tls", [True, False], ids=["peer_tls", "no_peer_tls"])
async def test_peer_forwarding_to_an_mtls_edge_uses_edge_peer_tls(
    tmp_path: Path, dataplane: str, with_peer_tls: bool,
) -> None:
    """An edge without the model forwards to a peer that requires cluster client certificates:
    with ``edge.peer_tls`` the peer serves it; without, the edge does not trust the peer's certificate (system
    CAs only), nothing reaches the peer and the edge's own 404 stands."""
    certs, _ = cluster_certs(tmp_path)
    a_cert, a_key = certs.clients["edge-a"]
    peer_tls = ({"ca_file": str(certs.ca_cert), "certfile": str(a_cert), "keyfile": str(a_key)}
                if with_peer_tls else {})
    tables: dict[str, RoutingTable] = {}
    peer_engine = FakeEngine()
    async with running_node(tmp_path / "peer", dataplane=dataplane, engine=peer_engine, workers=1,
                            cache={"enabled": False}, edge={"tls": edge_tls(certs)},
                            link=StaticLink("peer", tables)) as peer, \
            running_node(tmp_path / "a", dataplane=dataplane, engine=FakeEngine(), workers=1,
                         cache={"enabled": False}, engine_model="some-other-model", edge={"peer_tls": peer_tls},
                         link=StaticLink("a", tables)) as edge_a:
        joined = routing_table_from_join(peer).nodes[0]  # https://, from what the peer advertises
        tables["t"] = RoutingTable(1, 1, (replace(joined, node_id="peer"),))
        for _ in range(100):
            if edge_a.routing_table_or_empty().version == 1:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # the fast front pushes the table on to its workers every 0.25 s
        warmed = len(peer_engine.calls)  # the runtime's warm-up batches
        async with httpx.AsyncClient(timeout=20) as c:
            r = await c.post(f"{edge_a.url}/v1/embeddings", json={"model": MODEL, "input": "forward me"})
        if with_peer_tls:
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["embedding"]) == 384 and len(peer_engine.calls) == warmed + 1
        else:
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            assert len(peer_engine.calls) == warmed


def test_edge_tls_files_are_set_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set together"):
        load_settings(data_dir=str(tmp_path), gateway={"edge_tls": {"ca_file": "ca.crt", "certfile": "gw.crt"}})
    with pytest.raises(ConfigError, match="set together"):
        load_settings(data_dir=str(tmp_path), edge={"peer_tls": {"keyfile": "gw.key"}})
    assert not load_settings(data_dir=str(tmp_path)).gateway.edge_tls.enabled
