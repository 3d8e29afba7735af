"""An edge reached only through its reverse tunnel (issue 17), end to end on loopback.

The real CLI (``gazsi edge serve --control-plane URL --join-token T --tunnel HOST:PORT``, ONNX CPU
engine) joins the control plane over HTTPS, gets its certificate, dials the gateway's tunnel listener
with it, and serves embeddings the gateway relays down the tunnel. Checked: the table lists the node as
``tunnel://<id>``, the tunnel's id is the certificate's, the answer is the node's own (same vector as
asking it directly), a stopped edge leaves the gateway's routing at once and the client gets a 503 in
OpenAI's shape; a certificate from another CA, an expired one, none at all, and a reconnect flood are
refused by the tunnel listener with a reason, and nothing crashes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gazsi_cluster.tls import CertAuthority, create_deployment_certs, private_key_pem
from tests.support.edge import EdgeProcess
from tests.support.tunnel import TOKEN, TunnelCluster, tunnel_cluster, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MODEL = "all-MiniLM-L6-v2"
BODY = {"model": MODEL, "input": ["through the tunnel", "and back"]}


@pytest.fixture
async def cluster(tmp_path: Path):
    async with tunnel_cluster(tmp_path) as c:
        yield c


def _edge(cluster: TunnelCluster, data_dir: Path) -> EdgeProcess:
    return EdgeProcess(data_dir, "--dataplane", "fast", "--workers", "1", "--no-auth", *cluster.edge_args())


async def _tunnelled_node(cluster: TunnelCluster, limit_s: float = 30) -> str:
    async def routed() -> str | None:
        for n in cluster.gateway.table().nodes:
            if n.url.startswith("tunnel://"):
                return n.node_id
        return None

    return await until(routed, limit_s, "the edge routable through its tunnel at the gateway")


async def test_embeddings_reach_the_edge_through_its_tunnel(cluster: TunnelCluster, tmp_path: Path) -> None:
    edge = await asyncio.to_thread(_edge, cluster, tmp_path / "edge")
    try:
        node_id = await _tunnelled_node(cluster)
        assert cluster.server.cp.table.by_id[node_id].url == f"tunnel://{node_id}"
        assert set(cluster.hub.tunnels) == {node_id}  # the id the certificate names, nothing claimed
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(cluster.gateway_url + "/v1/embeddings", json=BODY)
            assert r.status_code == 200, r.text
            direct = await http.post(edge.url + "/v1/embeddings", json=BODY)
            # The tunnelled answer is this node's: the same vectors as asking it directly.
            got = np.array([d["embedding"] for d in r.json()["data"]])
            want = np.array([d["embedding"] for d in direct.json()["data"]])
            assert got.shape == (2, 384) and np.allclose(got, want, atol=1e-5)
            many = await asyncio.gather(*(http.post(cluster.gateway_url + "/v1/embeddings",
                                                    json={"model": MODEL, "input": f"text {i}"}) for i in range(40)))
            assert [m.status_code for m in many] == [200] * 40
            big = await http.post(cluster.gateway_url + "/v1/embeddings",
                                  json={"model": MODEL, "input": [f"input {i}" for i in range(512)]})
            assert big.status_code == 200 and len(big.json()["data"]) == 512  # ~4 MB: many windows' worth
            ready = (await http.get(edge.admin + "/readyz")).json()
            assert ready["tunnel"]["state"] == "connected", ready
    finally:
        dropped = time.monotonic()
        await asyncio.to_thread(edge.stop)

    async def gone() -> bool | None:
        return True if node_id not in cluster.gateway.table().by_id else None

    await until(gone, 3, "the stopped edge out of the gateway's routing")
    print(f"node left the gateway's table {time.monotonic() - dropped:.2f}s after SIGTERM")
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(cluster.gateway_url + "/v1/embeddings", json=BODY)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text


def _ctx(cert: Path | None, key: Path | None, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def _dial(cluster: TunnelCluster, ctx: ssl.SSLContext) -> str:
    """Open a tunnel connection as an edge would; 'closed' when the gateway hangs up on it."""
    host, port = cluster.settings.gateway.tunnel_host, cluster.hub.port
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 5)
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    try:
        data = await asyncio.wait_for(reader.read(1024), 3)
        return "open" if data else "closed"
    except (ssl.SSLError, OSError) as exc:  # TLS 1.3: the server's alert arrives after the client's handshake
        return f"refused: {exc}"
    finally:
        writer.close()


def _expired_cert(ca_dir: Path, out: Path, name: str) -> tuple[Path, Path]:
    ca = CertAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now - dt.timedelta(days=1))
            .sign(ca.key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(private_key_pem(key))
    return out / f"{name}.crt", out / f"{name}.key"


async def test_only_cluster_certificates_open_tunnels(cluster: TunnelCluster, tmp_path: Path) -> None:
    ca = cluster.ca_cert
    other = create_deployment_certs(tmp_path / "other-ca", clients=["n-intruder"])
    foreign = _ctx(*other.clients["n-intruder"], ca)
    expired = _ctx(*_expired_cert(cluster.tls_dir, tmp_path / "expired", "n-old"), ca)
    member = create_deployment_certs(cluster.tls_dir, hosts=["127.0.0.1"], clients=["n-member"], overwrite=True)
    assert (await _dial(cluster, foreign)).startswith(("refused", "closed"))
    assert (await _dial(cluster, expired)).startswith(("refused", "closed"))
    assert (await _dial(cluster, _ctx(None, None, ca))).startswith(("refused", "closed"))
    assert not cluster.hub.tunnels
    reasons = " | ".join(cluster.hub.refused)
    assert sum(cluster.hub.refused.values()) == 3 and "TLS handshake failed" in reasons, cluster.hub.refused
    # A certificate the cluster CA signed opens a tunnel, under the id it names (and no other).
    assert await _dial(cluster, _ctx(*member.clients["n-member"], ca)) in ("open", "closed")
    # The edge never took the node id from anything but the certificate: "n-member" was all it could be.
    assert cluster.hub.closed_at.keys() <= {"n-member"}


async def test_a_reconnect_flood_is_bounded(tmp_path: Path) -> None:
    async with tunnel_cluster(tmp_path, gateway={"tunnel": {"max_handshakes": 4}}) as cluster:
        member = create_deployment_certs(cluster.tls_dir, hosts=["127.0.0.1"], clients=["n-flood"], overwrite=True)
        ctx = _ctx(*member.clients["n-flood"], cluster.ca_cert)
        results = await asyncio.gather(*(_dial(cluster, ctx) for _ in range(60)))
        # Some dials were turned away before any crypto, the gateway kept serving, and at most one tunnel
        # per node id survives (each reconnect replaces the previous one).
        assert cluster.hub.refused.get("too many handshakes at once", 0) > 0, cluster.hub.refused
        assert len(cluster.hub.tunnels) <= 1
        assert "open" in results or "closed" in results
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(cluster.gateway_url + "/healthz")).status_code == 200


async def test_a_missing_join_token_is_refused(cluster: TunnelCluster, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    args = [a for a in cluster.edge_args() if a not in ("--join-token", TOKEN)]
    cmd = [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve",
           "--data-dir", str(tmp_path / "edge"), "--port", "0", "--backend", "fake", "--no-auth", *args]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                env=dict(os.environ))
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 2, text
    assert "no join token" in text and "--join-token" in text, text
    assert not cluster.hub.tunnels and not cluster.server.cp.list_nodes()


async def test_the_tunnel_of_a_node_the_control_plane_does_not_list_is_closed(tmp_path: Path) -> None:
    from gazsi_cluster.tunnel import TunnelConnection

    async with tunnel_cluster(tmp_path, gateway={"tunnel": {"orphan_grace_s": 0.5}}) as cluster:
        # A certificate the cluster CA signed once, for a node the control plane no longer has (removed,
        # or its certificate revoked with it): the tunnel opens, then is closed within the grace.
        ghost = create_deployment_certs(cluster.tls_dir, hosts=["127.0.0.1"], clients=["n-ghost"], overwrite=True)
        ctx = _ctx(*ghost.clients["n-ghost"], cluster.ca_cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", cluster.hub.port, ssl=ctx,
                                                       server_hostname="127.0.0.1")

        async def never(*_: object):  # pragma: no cover - nothing is routed to an unlisted node
            raise AssertionError("routed to an unlisted node")

        edge = TunnelConnection(reader, writer, client_side=False, name="ghost", handler=never)
        await edge.start()
        try:
            async def up() -> bool | None:
                return True if "n-ghost" in cluster.hub.tunnels else None

            await until(up, 5, "the ghost's tunnel accepted (its certificate is the cluster's)")
            opened = time.monotonic()
            await asyncio.wait_for(edge.closed.wait(), 5)
            print(f"unlisted node's tunnel closed after {time.monotonic() - opened:.2f}s")
            assert cluster.hub.refused.get("not listed by the control plane") == 1, cluster.hub.refused
            assert "n-ghost" not in cluster.hub.tunnels
        finally:
            await edge.aclose()


async def test_an_edge_refuses_a_tunnel_listener_the_cluster_ca_did_not_sign(cluster: TunnelCluster,
                                                                              tmp_path: Path) -> None:
    from gazsi_cluster.config import GatewayConfig
    from gazsi_cluster.http.listener import bind_socket
    from gazsi_cluster.tunnel import tunnel_hub

    # A listener in the middle with a certificate from another CA (it would even accept the node's certificate).
    other = create_deployment_certs(tmp_path / "mitm", hosts=["127.0.0.1"])
    mitm = tunnel_hub(GatewayConfig(tunnel_port=0, tunnel_tls={
        "certfile": str(other.server_cert), "keyfile": str(other.server_key),
        "client_ca_file": str(cluster.ca_cert), "require_client_cert": True}))
    assert mitm is not None
    await mitm.start(bind_socket("127.0.0.1", 0))
    args = [a if a != cluster.tunnel_addr() else f"127.0.0.1:{mitm.port}" for a in cluster.edge_args()]
    edge = await asyncio.to_thread(EdgeProcess, tmp_path / "edge", "--dataplane", "fast", "--workers", "1",
                                   "--no-auth", "--backend", "fake", *args)
    try:
        async def refused() -> dict | None:
            ready = (await asyncio.to_thread(httpx.get, edge.admin + "/readyz", timeout=5)).json()
            tunnel = ready.get("tunnel") or {}
            return tunnel if tunnel.get("failures", 0) >= 2 else None

        tunnel = await until(refused, 20, "the edge refusing the foreign listener twice", step_s=0.2)
        assert "CERTIFICATE_VERIFY_FAILED" in tunnel["last_error"] and tunnel["state"] != "connected", tunnel
        assert not mitm.tunnels and not cluster.hub.tunnels
        # It joined the real control plane all the same; only the tunnel is refused.
        assert [n["state"] for n in cluster.server.cp.list_nodes()] in (["healthy"], ["joining"])
    finally:
        await asyncio.to_thread(edge.stop)
        await mitm.stop()
