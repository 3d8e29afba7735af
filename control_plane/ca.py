"""The cluster CA: created with ``cryptography`` on first start, persisted under ``data_dir/ca``.

It issues each node a client certificate at join (from the node's CSR, or with a key made for
it) whose common name is the node id, and the control plane its own server certificate.
Heartbeats over HTTPS are then authenticated by the certificate (mTLS), not by a token.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gazsi_cluster.errors import InvalidRequest
from gazsi_cluster.tls import CertAuthority, authority_key_id, private_key_pem, utc_now, write_private

__all__ = ["ClusterCA", "IssuedCert", "node_id_from_cert"]

_CA_DAYS = 3650


@dataclass(frozen=True, slots=True)
class IssuedCert:
    cert_pem: bytes
    key_pem: bytes | None  # only when the key was generated for the node (no CSR given)


def node_id_from_cert(der: bytes) -> str | None:
    """The node id (common name) of a DER certificate, or None."""
    try:
        cert = x509.load_der_x509_certificate(der)
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


class ClusterCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, directory: Path) -> None:
        self.key, self.cert, self.directory = key, cert, directory

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @classmethod
    def load_or_create(cls, data_dir: Path, *, name: str = "GAZSI cluster CA") -> ClusterCA:
        """Load ``data_dir/ca/ca.{key,crt}``, creating them on first start."""
        d = Path(data_dir) / "ca"
        key_path, cert_path = d / "ca.key", d / "ca.crt"
        if key_path.exists() and cert_path.exists():
            loaded = CertAuthority.load(cert_path, key_path)
            return cls(loaded.key, loaded.cert, d)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = CertAuthority.create(name, days=_CA_DAYS)
        write_private(key_path, private_key_pem(created.key))
        cert_path.write_bytes(created.cert.public_bytes(serialization.Encoding.PEM))
        return cls(created.key, created.cert, d)

    def _sign(self, subject_cn: str, public_key: ec.EllipticCurvePublicKey, *, days: int,
              san: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(utc_now() - dt.timedelta(minutes=5))
            .not_valid_after(utc_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(authority_key_id(self.cert), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_node_cert(self, node_id: str, csr_pem: str | bytes | None = None, *, days: int = 30) -> IssuedCert:
        """Sign a client certificate for ``node_id`` (its CN, whatever the CSR asked for)."""
        key_pem: bytes | None = None
        if csr_pem:
            try:
                csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
            except ValueError as exc:
                raise InvalidRequest("csr is not a PEM certificate request", param="csr") from exc
            if not csr.is_signature_valid:
                raise InvalidRequest("csr signature is invalid", param="csr")
            public = csr.public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise InvalidRequest("csr must carry an EC (P-256) key", param="csr")
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            public, key_pem = key.public_key(), private_key_pem(key)
        cert = self._sign(node_id, public, days=days, san=[x509.DNSName(node_id)],
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    def server_cert(self, hosts: list[str], *, days: int = 365) -> tuple[Path, Path]:
        """Issue (and write) the control plane's server certificate; returns (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = []
        for h in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                san.append(x509.DNSName(h))
        cert = self._sign("gazsi-control-plane", key.public_key(), days=days, san=san,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH)
        cert_path, key_path = self.directory / "server.crt", self.directory / "server.key"
        write_private(key_path, private_key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path
