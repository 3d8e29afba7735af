"""What `gazsi up` sets up for edges on other machines (issue 17): the control plane's HTTPS join API and
the gateway's reverse-tunnel listener, both with the cluster CA, and a join token kept in a file.

Files (all under ``<data dir>``): ``ca/ca.crt`` (the cluster CA; its key stays beside it, 0600),
``cluster/join-token`` (0600, made once), ``cluster/tunnel.{crt,key}`` (the tunnel listener's certificate)
and ``cluster/join.json`` (URLs and paths, for scripts). The token reaches the control plane as a file
path (``control_plane.join_token_file``), so it is in no Serve config and no environment.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from gazsi_cli.ports import free_port
from gazsi_cluster.config import Settings
from gazsi_cluster.tls import CertAuthority, write_private

__all__ = ["OutsideAccess", "prepare"]


@dataclass(frozen=True)
class OutsideAccess:
    control_plane_url: str
    ca_file: str
    join_token_file: str | None  # None: the operator configured control_plane.join_token themselves
    tunnel: str  # host:port of the gateway's tunnel listener

    def env(self, settings: Settings) -> dict[str, str]:
        """The GAZSI_* settings the Serve app needs for this (added to what `up` passes through)."""
        host, _, port = self.tunnel.rpartition(":")
        cluster = settings.data_dir / "cluster"
        env = {
            "GAZSI_CONTROL_PLANE__SERVE_HTTPS": "true",
            "GAZSI_CONTROL_PLANE__PORT": self.control_plane_url.rpartition(":")[2],
            "GAZSI_GATEWAY__TUNNEL_PORT": port,
            "GAZSI_GATEWAY__TUNNEL_HOST": host,
            "GAZSI_GATEWAY__TUNNEL_TLS__CERTFILE": str(cluster / "tunnel.crt"),
            "GAZSI_GATEWAY__TUNNEL_TLS__KEYFILE": str(cluster / "tunnel.key"),
            "GAZSI_GATEWAY__TUNNEL_TLS__CLIENT_CA_FILE": self.ca_file,
            "GAZSI_GATEWAY__TUNNEL_TLS__REQUIRE_CLIENT_CERT": "true",
        }
        if self.join_token_file is not None:
            env["GAZSI_CONTROL_PLANE__JOIN_TOKEN_FILE"] = self.join_token_file
        return env

    def write(self, data_dir: Path) -> Path:
        path = data_dir / "cluster" / "join.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    def lines(self) -> list[str]:
        """The operator's text. The join command names plain `gazsi`: it runs on another machine, with gazsi
        installed there, where a path into this machine's virtual environment would mean nothing."""
        token = f'"$(cat {self.join_token_file})"' if self.join_token_file else "<control_plane.join_token>"
        return [
            f"  control plane (HTTPS join API):  {self.control_plane_url}",
            f"  tunnel listener (edges dial it): {self.tunnel}",
            f"  cluster CA: {self.ca_file}" + (f"   join token: {self.join_token_file} (0600)"
                                              if self.join_token_file else ""),
            "",
            "  join an edge from another machine (it dials out: no inbound port, works behind NAT):",
            f"  gazsi edge serve --control-plane {self.control_plane_url} --ca-file {self.ca_file} \\",
            f"       --join-token {token} --tunnel {self.tunnel}",
        ]


def prepare(settings: Settings) -> OutsideAccess:
    """Make (once) the CA, the token and the tunnel certificate; choose the ports (configured ones win)."""
    from control_plane.ca import ClusterCA

    cp, gw = settings.control_plane, settings.gateway
    cluster = settings.data_dir / "cluster"
    cluster.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = ClusterCA.load_or_create(settings.data_dir)
    token_file: Path | None = None
    if not cp.join_token:
        token_file = cp.join_token_file or cluster / "join-token"
        if not token_file.exists():
            write_private(token_file, secrets.token_urlsafe(32).encode())
    # The configured port (default 8443) when it is free, so the URL operators write down stays the same;
    # another free one when something else holds it (a shared machine), said in the printed URL.
    cp_port = cp.port if cp.port and _bindable(cp.host, cp.port) else free_port()
    tunnel_port = gw.tunnel_port or free_port()
    hosts = list(dict.fromkeys([gw.tunnel_host, "localhost", "127.0.0.1"]))
    cert_pem, key_pem = CertAuthority.load(ca.cert_path, ca.directory / "ca.key").issue("gazsi-gateway-tunnel",
                                                                                          hosts=hosts)
    write_private(cluster / "tunnel.key", key_pem)
    (cluster / "tunnel.crt").write_bytes(cert_pem)
    return OutsideAccess(f"https://{cp.host}:{cp_port}", str(ca.cert_path), str(token_file) if token_file else None,
                         f"{gw.tunnel_host}:{tunnel_port}")


def _bindable(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
