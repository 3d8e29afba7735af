"""HTTPS on the public listener: certificates from `gazsi certs`, verified round trips, TLS 1.1 refused."""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from gazsi_cli.main import main
from gazsi_cluster.tls import client_context, create_deployment_certs, server_context
from tests.support.edge import TRANSPORTS

from .conftest import running_edge

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_gazsi_certs_create_writes_a_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tls"
    assert main(["certs", "create", "--out", str(out), "--host", "edge-1.example", "--host", "10.0.0.7",
                 "--client", "ops"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    client = x509.load_pem_x509_certificate((out / "ops.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-1.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert (out / "server.key").stat().st_mode & 0o077 == 0  # private keys are not group/world readable
    # A second run keeps the CA (clients keep trusting it) and refuses to clobber without --force.
    assert main(["certs", "create", "--out", str(out)]) == 2
    assert main(["certs", "create", "--out", str(out), "--force"]) == 0
    assert x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()) == ca
    assert "server.crt" in capsys.readouterr().out


def test_server_context_floor_is_tls12() -> None:
    certs = create_deployment_certs(Path(__import__("tempfile").mkdtemp()))
    assert server_context(certs.server_cert, certs.server_key).minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("dataplane", TRANSPORTS)
async def test_https_round_trip_openai_client_and_keep_alive(tmp_path: Path, dataplane: str) -> None:
    from openai import AsyncOpenAI

    certs = create_deployment_certs(tmp_path / "tls", hosts=["localhost", "127.0.0.1"])
    tls = {"certfile": str(certs.server_cert), "keyfile": str(certs.server_key)}
    async with running_edge(tmp_path, dataplane=dataplane, tls=tls) as (server, _):
        base = f"https://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(verify=client_context(certs.ca_cert)) as http:
            oai = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", http_client=http, max_retries=0)
            res = await oai.embeddings.create(model="all-MiniLM-L6-v2", input=["hello", "world"])
            assert len(res.data) == 2 and len(res.data[0].embedding) == 384
            r = await http.get(f"{base}/healthz")
            assert r.status_code == 200 and r.http_version == "HTTP/1.1"
        # Without the CA the certificate is not trusted.
        async with httpx.AsyncClient(verify=True) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"{base}/healthz")

        def two_on_one_connection() -> list[bytes]:
            ctx = client_context(certs.ca_cert)
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as s:
                answers = []
                for _ in range(2):
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    buf = b""
                    while b'"ok"}' not in buf:
                        buf += s.recv(65536)
                    answers.append(buf)
                return answers
        answers = await asyncio.to_thread(two_on_one_connection)
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)


def _handshake(port: int, ca: Path, max_version: ssl.TLSVersion) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old protocols at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = max_version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                return str(s.version())
        except ssl.SSLError as exc:
            return f"refused: {exc.reason}"


@pytest.mark.parametrize("dataplane", TRANSPORTS)
async def test_tls11_is_refused_tls12_accepted(tmp_path: Path, dataplane: str) -> None:
    certs = create_deployment_certs(tmp_path / "tls")
    tls = {"certfile": str(certs.server_cert), "keyfile": str(certs.server_key)}
    async with running_edge(tmp_path, dataplane=dataplane, tls=tls) as (server, _):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = await asyncio.to_thread(_handshake, server.port, certs.ca_cert, ssl.TLSVersion.TLSv1_1)
        # asyncio's TLS layer may hang up instead of sending the alert; either way no session.
        # The same client completes TLS 1.1 with a permissive server (the control test below).
        assert old in ("refused: TLSV1_ALERT_PROTOCOL_VERSION", "refused: UNEXPECTED_EOF_WHILE_READING")
        assert await asyncio.to_thread(_handshake, server.port, certs.ca_cert, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


def test_this_client_can_speak_tls11_at_all(tmp_path: Path) -> None:
    """Control for the test above: a permissive server does complete a TLS 1.1 handshake with that client."""
    import threading

    certs = create_deployment_certs(tmp_path / "tls")
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    srv.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        srv.minimum_version = ssl.TLSVersion.TLSv1
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            srv.wrap_socket(conn, server_side=True).close()
        except ssl.SSLError:
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            version = _handshake(listener.getsockname()[1], certs.ca_cert, ssl.TLSVersion.TLSv1_1)
    finally:
        t.join(5)
        listener.close()
    if version.startswith("refused"):
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 even permissively ({version}); the refusal test is moot")
    assert version == "TLSv1.1"
