from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from control_plane.ca import ClusterCA, node_id_from_cert
from gazsi_cluster.errors import InvalidRequest

pytestmark = pytest.mark.unit


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "evil") -> bytes:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_ca_created_once_and_persisted(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path)
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = ClusterCA.load_or_create(tmp_path)
    assert again.cert_pem == ca.cert_pem


def test_issue_from_csr_forces_node_id_and_verifies(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue_node_cert("n-1", _csr(key, cn="someone-else"))
    assert issued.key_pem is None
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    assert node_id_from_cert(cert.public_bytes(serialization.Encoding.DER)) == "n-1"
    assert cert.public_key() == key.public_key()


def test_issue_without_csr_generates_key(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path)
    issued = ca.issue_node_cert("n-2")
    assert issued.key_pem is not None and b"PRIVATE KEY" in issued.key_pem
    x509.load_pem_x509_certificate(issued.cert_pem).verify_directly_issued_by(ca.cert)


def test_bad_csrs_rejected(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path)
    with pytest.raises(InvalidRequest):
        ca.issue_node_cert("n", "not a csr")
    with pytest.raises(InvalidRequest):
        ca.issue_node_cert("n", _csr(rsa.generate_private_key(65537, 2048)))


def test_other_ca_cert_is_not_ours(tmp_path: Path) -> None:
    ours = ClusterCA.load_or_create(tmp_path / "a")
    theirs = ClusterCA.load_or_create(tmp_path / "b")
    cert = x509.load_pem_x509_certificate(theirs.issue_node_cert("x").cert_pem)
    with pytest.raises((ValueError, TypeError, Exception)):
        cert.verify_directly_issued_by(ours.cert)
    assert node_id_from_cert(b"garbage") is None


def test_certificates_name_a_foreign_ca_by_its_own_key_id(tmp_path: Path) -> None:
    """A CA made elsewhere (helm's genCA under Go 1.25+: truncated SHA-256) keeps its subject key id, and what we
    sign must carry that id as its authority key id: with the SHA-1 one OpenSSL finds no issuer for the chain."""
    import contextlib
    import datetime as dt
    import hashlib
    import ssl

    from gazsi_cluster.tls import private_key_pem, write_private

    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    ski = hashlib.sha256(point).digest()[:20]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gz-gazsi-cluster-ca")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
               .sign(key, hashes.SHA256()))
    (tmp_path / "ca").mkdir()
    write_private(tmp_path / "ca" / "ca.key", private_key_pem(key))
    (tmp_path / "ca" / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca = ClusterCA.load_or_create(tmp_path)
    cert_path, key_path = ca.server_cert(["127.0.0.1"])
    aki = x509.load_pem_x509_certificate(cert_path.read_bytes()).extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski
    issued = x509.load_pem_x509_certificate(ca.issue_node_cert("n-2").cert_pem)
    assert issued.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    # OpenSSL builds the chain: a server with that certificate is trusted by a client trusting only this CA.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))
    a, b = ssl.MemoryBIO(), ssl.MemoryBIO()
    c, d = ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(a, b, server_side=True)
    cli = client.wrap_bio(c, d, server_hostname="127.0.0.1")
    for _ in range(10):
        for side, outbox, peer_in in ((cli, d, a), (srv, b, c)):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            peer_in.write(outbox.read())
    assert cli.getpeercert() is not None  # handshake done, chain verified
