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
