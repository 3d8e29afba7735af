"""Certificates and TLS contexts for the public listeners (edge, gateway) and their clients,
including the cluster's own clients (gateway -> edge, edge -> peer: :func:`routing_client_context`).

``create_deployment_certs`` writes a CA plus server and client certificates (``gazsi certs``);
``server_context`` / ``client_context`` build :class:`ssl.SSLContext` objects with TLS 1.2 as
the explicit floor. Keys are EC P-256 (small, fast handshakes, supported by every TLS 1.2 client).

>>> paths = create_deployment_certs(tmp, hosts=["edge-1.example"], clients=["ops"])  # doctest: +SKIP
>>> ctx = server_context(paths.server_cert, paths.server_key)                         # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gazsi_cluster.config import ClusterClientTLSConfig, TLSConfig
from gazsi_cluster.errors import ConfigError

__all__ = [
    "CertAuthority",
    "DeploymentCerts",
    "authority_key_id",
    "client_context",
    "cluster_client_context",
    "create_deployment_certs",
    "private_key_pem",
    "routing_client_context",
    "server_context",
    "utc_now",
    "uvicorn_ssl_options",
    "write_private",
]

_CA_DAYS = 3650


def authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of a certificate ``ca`` signs: the CA's own subject key id when it has one.

    Computing it from the public key (SHA-1) is not enough: CAs made elsewhere may use another method
    (Go 1.25+, hence helm's genCA, uses truncated SHA-256), and OpenSSL then finds no issuer for the chain.
    """
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM (written only through :func:`write_private`)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    # 0600 from creation: no moment where a private key is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass
class CertAuthority:
    """A CA key and certificate that sign server and client certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "GAZSI deployment CA", *, days: int = _CA_DAYS) -> CertAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(utc_now() - dt.timedelta(minutes=5))
            .not_valid_after(utc_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertAuthority:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an EC private key")
        return cls(key, x509.load_pem_x509_certificate(Path(cert_path).read_bytes()))

    def issue(
        self, common_name: str, *, hosts: Sequence[str] = (), client: bool = False, days: int = 365
    ) -> tuple[bytes, bytes]:
        """A new key and a certificate for it; returns (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(utc_now() - dt.timedelta(minutes=5))
            .not_valid_after(utc_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(authority_key_id(self.cert), critical=False)
        )
        names = _san(hosts or ([] if client else [common_name]))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class DeploymentCerts:
    """Where :func:`create_deployment_certs` wrote its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def create_deployment_certs(
    out_dir: Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    clients: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> DeploymentCerts:
    """Write ``ca.{crt,key}``, ``server.{crt,key}`` (SAN = ``hosts``) and ``<client>.{crt,key}``.

    An existing CA in ``out_dir`` is reused (so new certificates chain to what clients already
    trust); ``overwrite`` is needed to replace an existing server certificate.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    if ca_cert.exists() and ca_key.exists():
        ca = CertAuthority.load(ca_cert, ca_key)
    else:
        ca = CertAuthority.create()
        write_private(ca_key, private_key_pem(ca.key))
        ca_cert.write_bytes(ca.cert_pem)
    server_cert, server_key = out / "server.crt", out / "server.key"
    if server_cert.exists() and not overwrite:
        raise ConfigError(f"{server_cert} exists; pass overwrite (--force) to replace it")
    if not hosts:
        raise ConfigError("at least one host name or address is needed for the server certificate")
    cert_pem, key_pem = ca.issue(hosts[0], hosts=hosts, days=days)
    write_private(server_key, key_pem)
    server_cert.write_bytes(cert_pem)
    result = DeploymentCerts(ca_cert, ca_key, server_cert, server_key)
    for name in clients:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"invalid client name {name!r}")
        c_pem, k_pem = ca.issue(name, client=True, days=days)
        c_path, k_path = out / f"{name}.crt", out / f"{name}.key"
        write_private(k_path, k_pem)
        c_path.write_bytes(c_pem)
        result.clients[name] = (c_path, k_path)
    return result


def server_context(
    certfile: Path | str, keyfile: Path | str, *, client_ca: Path | str | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context that refuses anything older than TLS 1.2 (set explicitly, not left to OpenSSL's build)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation, no compression (CRIME), server picks the cipher.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {certfile} / key {keyfile}: {exc}") from exc
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(
    ca_file: Path | str, *, certfile: Path | str | None = None, keyfile: Path | str | None = None
) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` only, TLS 1.2+, optionally presenting a client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        ctx.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    return ctx


def cluster_client_context(
    ca_file: Path | str, certfile: Path | str, keyfile: Path | str, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """Client side of mTLS inside the cluster (gateway → edge): trusts only the cluster CA and
    presents a certificate that CA signed, so an edge can refuse anything but cluster members.

    ``check_hostname=False`` still verifies the chain against the cluster CA but not the name, for
    edges whose certificate names their node id rather than the address the gateway dials.
    """
    try:
        ctx = client_context(ca_file, certfile=certfile, keyfile=keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the cluster CA {ca_file} or client certificate {certfile}: {exc}") from exc
    ctx.check_hostname = check_hostname
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def routing_client_context(cfg: ClusterClientTLSConfig) -> ssl.SSLContext | None:
    """The context a routing client dials ``https://`` edges with: ``gateway.edge_tls`` on a gateway,
    ``edge.peer_tls`` on an edge; None when the section is off (aiohttp then verifies against the
    system CAs and presents nothing). Built at start-up, so a bad file fails there, not per request.

    >>> RoutingClient(table, policy, ssl_context=routing_client_context(settings.gateway.edge_tls))  # doctest: +SKIP
    """
    if cfg.ca_file is None or cfg.certfile is None or cfg.keyfile is None:
        return None
    return cluster_client_context(cfg.ca_file, cfg.certfile, cfg.keyfile, check_hostname=cfg.check_hostname)


def listener_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The server context of a public listener's ``tls`` section; None when TLS is off.

    Built (and so validated) when called, at start-up: a bad file fails there, not at the first handshake.
    """
    if tls.certfile is None or tls.keyfile is None:
        return None
    return server_context(tls.certfile, tls.keyfile, client_ca=tls.client_ca_file,
                          require_client_cert=tls.require_client_cert)


def uvicorn_ssl_options(tls: TLSConfig) -> dict[str, Any]:
    """uvicorn ``Config`` options serving ``tls`` (empty when TLS is off)."""
    ctx = listener_context(tls)
    if ctx is None:
        return {}

    def factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ctx

    return {"ssl_context_factory": factory}
