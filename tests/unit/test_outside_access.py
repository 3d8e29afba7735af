"""What `gazsi up` prepares for edges on other machines (issue 17): CA, a 0600 join token made once, the
tunnel listener's certificate from the cluster CA, the Serve env (a token *file*, never the token) and
the printed join command."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from gazsi_cli.outside import prepare
from gazsi_cluster.config import load_settings

pytestmark = pytest.mark.unit


def test_prepare_makes_the_files_once_and_prints_a_join_command(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    first = prepare(settings)
    token_file = Path(first.join_token_file or "")
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text()) >= 32
    token = token_file.read_text()
    again = prepare(settings)
    assert token_file.read_text() == token and again.ca_file == first.ca_file  # the same CA and token
    env = first.env(settings)
    assert env["GAZSI_CONTROL_PLANE__SERVE_HTTPS"] == "true"
    assert env["GAZSI_CONTROL_PLANE__JOIN_TOKEN_FILE"] == str(token_file)
    assert token not in "".join(env.values())  # the secret itself goes into no Serve config
    assert env["GAZSI_GATEWAY__TUNNEL_TLS__CLIENT_CA_FILE"] == first.ca_file
    # The tunnel certificate chains to the cluster CA (what edges verify the gateway with).
    cert = x509.load_pem_x509_certificate(Path(env["GAZSI_GATEWAY__TUNNEL_TLS__CERTFILE"]).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(first.ca_file).read_bytes())
    cert.verify_directly_issued_by(ca)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the pair loads as a server certificate
    server.load_cert_chain(env["GAZSI_GATEWAY__TUNNEL_TLS__CERTFILE"], env["GAZSI_GATEWAY__TUNNEL_TLS__KEYFILE"])
    text = "\n".join(first.lines())
    assert f"--join-token \"$(cat {token_file})\"" in text and f"--tunnel {first.tunnel}" in text
    assert f"--control-plane {first.control_plane_url}" in text and f"--ca-file {first.ca_file}" in text


def test_a_configured_join_token_is_not_replaced(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path), control_plane={"join_token": "mine-0123456789"})
    access = prepare(settings)
    assert access.join_token_file is None and "GAZSI_CONTROL_PLANE__JOIN_TOKEN_FILE" not in access.env(settings)
    assert not (tmp_path / "cluster" / "join-token").exists()
