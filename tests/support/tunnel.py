"""A control plane and a gateway with a tunnel listener, in this test's event loop (issue 17).

The operator's CA (``create_deployment_certs``) is the cluster CA: the control plane signs node
certificates with it at join, and the gateway's tunnel listener holds a server certificate from it
and accepts only client certificates it signed. Edges are started by the tests (``gazsi edge serve
--control-plane URL --join-token T --tunnel HOST:PORT``), in this namespace or another.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from control_plane.server import ControlPlaneServer
from control_plane.service import ControlPlane
from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import Settings, load_settings
from gazsi_cluster.gateway import DirectGateway, Gateway, create_gateway_app
from gazsi_cluster.http.listener import HttpListener, bind_socket
from gazsi_cluster.tls import create_deployment_certs
from gazsi_cluster.tunnel import TunnelHub, tunnel_hub

__all__ = ["TOKEN", "TunnelCluster", "serve_edge_in_namespace", "start_gateway", "stop_gateway", "tunnel_cluster",
           "until"]

TOKEN = "join-s3cret-0123456789"
MODEL = "all-MiniLM-L6-v2"
ADMIN = "admin-s3cret"
T = TypeVar("T")


@dataclass
class TunnelCluster:
    server: ControlPlaneServer
    ca_cert: Path
    tls_dir: Path
    settings: Settings
    gateway: Gateway
    hub: TunnelHub
    gateway_url: str
    admin: httpx.AsyncClient
    listener: HttpListener

    @property
    def cp_url(self) -> str:
        return self.server.url

    def tunnel_addr(self, host: str | None = None) -> str:
        return f"{host or self.settings.gateway.tunnel_host}:{self.hub.port}"

    async def restart_gateway(self) -> float:
        """Stop the gateway and its tunnel listener, start new ones on the same tunnel port; returns when
        the new one listens (time.monotonic())."""
        port = self.hub.port
        await stop_gateway(self.gateway, self.hub, self.listener)
        self.gateway, self.hub, self.listener, self.gateway_url = await start_gateway(
            self.settings, lambda: self.server.cp.table, tunnel_port=port)
        return time.monotonic()

    def edge_args(self, token: str = TOKEN, *, tunnel_host: str | None = None) -> list[str]:
        return ["--control-plane", self.cp_url, "--join-token", token, "--ca-file", str(self.ca_cert),
                "--tunnel", self.tunnel_addr(tunnel_host)]


async def until(probe: Callable[[], Awaitable[T | None]], limit_s: float, what: str, step_s: float = 0.02) -> T:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(step_s)
    raise AssertionError(f"not within {limit_s}s: {what}")


async def start_gateway(settings: Settings, table: Any, *, tunnel_port: int = 0,
                        hub: TunnelHub | None = None) -> tuple[Gateway, TunnelHub, HttpListener, str]:
    """Gateway + tunnel hub + direct listener, as the Gateway deployment wires them."""
    gw = settings.gateway
    hub = hub or tunnel_hub(settings.gateway)
    assert hub is not None
    await hub.start(bind_socket(gw.tunnel_host, tunnel_port, reuse_port=True))
    gateway = Gateway(settings, authorizer=AllowAll(), table=table, tunnels=hub)
    listener = HttpListener(DirectGateway(gateway, create_gateway_app(gateway)).handle, settings.limits)
    sock = bind_socket(gw.host, 0)
    port = sock.getsockname()[1]
    await listener.start(sock)
    return gateway, hub, listener, f"http://{gw.host}:{port}"


async def stop_gateway(gateway: Gateway, hub: TunnelHub, listener: HttpListener) -> None:
    await listener.stop(2)
    await hub.stop()
    await gateway.aclose()


@asynccontextmanager
async def tunnel_cluster(tmp: Path, *, host: str = "127.0.0.1", gateway: dict[str, Any] | None = None,
                         control_plane: dict[str, Any] | None = None) -> AsyncIterator[TunnelCluster]:
    """Control plane on ``host`` (HTTPS, any port) and a gateway whose tunnel listener is on ``host``."""
    tls = create_deployment_certs(tmp / "tls", hosts=[host, "localhost"])
    ca_dir = tmp / "cp" / "ca"
    ca_dir.mkdir(parents=True, mode=0o700)
    shutil.copy(tls.ca_cert, ca_dir / "ca.crt")
    shutil.copy(tls.ca_key, ca_dir / "ca.key")
    settings = load_settings(
        data_dir=str(tmp / "cp"), auth={"enabled": False},
        control_plane={"join_token": TOKEN, "admin_token": ADMIN, "port": 0, "host": host,
                       "heartbeat_interval_s": 0.5, "request_timeout_s": 5.0, **(control_plane or {})},
        gateway={"host": host, "tunnel_port": 0, "tunnel_host": host,
                 "tunnel_tls": {"certfile": str(tls.server_cert), "keyfile": str(tls.server_key),
                                "client_ca_file": str(tls.ca_cert), "require_client_cert": True},
                 **(gateway or {})},
    )
    server = ControlPlaneServer(ControlPlane(settings), host=host)
    await server.start()
    gw, hub, listener, url = await start_gateway(settings, lambda: server.cp.table)
    try:
        async with httpx.AsyncClient(base_url=server.url, verify=ssl.create_default_context(cafile=str(tls.ca_cert)),
                                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as admin:
            yield TunnelCluster(server, tls.ca_cert, tmp / "tls", settings, gw, hub, url, admin, listener)
    finally:
        await stop_gateway(gw, hub, listener)
        await server.stop()


async def serve_edge_in_namespace(cluster: TunnelCluster, tmp: Path, ns_pid: int, result: dict[str, Any], *,
                                  host: str, advertise: str, what: str, inputs: list[str],
                                  probes: Callable[[int], dict[str, Any]]) -> None:
    """``gazsi edge serve`` (real CLI, ONNX, fast front) in the network namespace of ``ns_pid``, joined and
    tunnelled to ``cluster``; records into ``result``: when it became routable, what the control plane
    knows of it, ``probes(port)`` (blocking, run off the loop), embeddings through the gateway, and how fast
    it leaves routing after kill -9. The namespace tests (veth, NAT) differ only in topology and probes."""
    import os
    import re
    import signal
    import subprocess
    import sys

    cmd = ["nsenter", f"--net=/proc/{ns_pid}/ns/net", sys.executable, "-m", "gazsi_cli.main",
           "--log-level", "warning", "edge", "serve", "--data-dir", str(tmp / "edge"), "--host", host,
           "--port", "0", "--dataplane", "fast", "--workers", "1", "--no-auth", "--advertise", advertise,
           *cluster.edge_args()]
    # Popen returns at once; its output is read off the loop (to_thread) while the control plane answers.
    edge = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,  # noqa: ASYNC220
                            env=dict(os.environ, GAZSI_ENGINE__ONNX_THREADS="1"))
    assert edge.stdout is not None
    lines: list[str] = []
    try:
        port = None
        while port is None:
            line = await asyncio.to_thread(edge.stdout.readline)
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on https?://[\d.]+:(\d+)", line)
            port = int(m[1]) if m else None
        result["edge_port"] = port
        if port is None:
            return

        async def routed() -> str | None:
            return next((n.node_id for n in cluster.gateway.table().nodes if n.url.startswith("tunnel://")), None)

        started = time.monotonic()
        node_id = await until(routed, 120, what, step_s=0.1)
        result["routable_after_s"] = round(time.monotonic() - started, 1)
        facts = cluster.server.cp.registry.get(node_id).facts
        result["table_url"] = cluster.server.cp.table.by_id[node_id].url
        result["facts_address"], result["reach"] = facts.address, facts.reach
        result["tunnel_ids"] = sorted(cluster.hub.tunnels)
        result["node_id"] = node_id
        # Blocking probes (subprocesses, connects with timeouts), off the loop the control plane runs on.
        result.update(await asyncio.to_thread(probes, port))
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(cluster.gateway_url + "/v1/embeddings", json={"model": MODEL, "input": inputs})
            result["via_gateway"] = {"status": r.status_code,
                                     "dims": [len(d["embedding"]) for d in r.json().get("data", [])]}
            t0 = time.monotonic()
            codes = [(await http.post(cluster.gateway_url + "/v1/embeddings",
                                      json={"model": MODEL, "input": f"n {i}"})).status_code for i in range(20)]
            result["twenty_requests_s"] = round(time.monotonic() - t0, 2)
            result["more_codes"] = sorted(set(codes))
            edge.send_signal(signal.SIGKILL)
            killed = time.monotonic()

            async def gone() -> bool | None:
                return True if node_id not in cluster.gateway.table().by_id else None

            await until(gone, 10, "the killed edge out of the gateway's routing", step_s=0.005)
            result["left_table_ms"] = round((time.monotonic() - killed) * 1000)
            after = await http.post(cluster.gateway_url + "/v1/embeddings", json={"model": MODEL, "input": "x"})
            result["after_kill"] = {"status": after.status_code, "body": after.json()}
    finally:
        if edge.poll() is None:
            edge.kill()
        edge.wait(10)
        result["edge_lines"] = lines[-8:]
