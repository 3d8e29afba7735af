"""A standalone ``gazsi edge serve --control-plane URL --join-token …`` joins the control plane's HTTPS API.

The control plane runs in this test's event loop (:class:`ControlPlaneServer`, the HTTPS join and
mTLS heartbeat API) and signs with the operator's CA (``gazsi certs``' :func:`create_deployment_certs`);
the edge is the real CLI in a subprocess. Checked: the node turns healthy in the registry and the
routing table with the URL it advertised; a wrong join token is refused, said once in the log, and
the edge exits non-zero; a stopping edge leaves the routing table at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography import x509

from control_plane.server import ControlPlaneServer
from control_plane.service import ControlPlane
from gazsi_cluster.config import load_settings
from gazsi_cluster.tls import create_deployment_certs
from tests.support.edge import EdgeProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "join-s3cret-0123456789"
ADMIN = "admin-s3cret"
T = TypeVar("T")


@dataclass
class Cluster:
    server: ControlPlaneServer
    ca_cert: Path
    admin: httpx.AsyncClient  # the control plane's admin API, verified against the operator's CA


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    # The operator's CA; the control plane issues node certificates from it (it reads data_dir/ca/ca.{crt,key}).
    tls = create_deployment_certs(tmp_path / "tls")
    ca_dir = tmp_path / "cp" / "ca"
    ca_dir.mkdir(parents=True, mode=0o700)
    shutil.copy(tls.ca_cert, ca_dir / "ca.crt")
    shutil.copy(tls.ca_key, ca_dir / "ca.key")
    settings = load_settings(data_dir=str(tmp_path / "cp"),
                             control_plane={"join_token": TOKEN, "admin_token": ADMIN, "port": 0})
    server = ControlPlaneServer(ControlPlane(settings))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, verify=ssl.create_default_context(cafile=str(tls.ca_cert)),
                                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as admin:
            yield Cluster(server, tls.ca_cert, admin)
    finally:
        await server.stop()


def edge_args(cluster: Cluster, token: str) -> list[str]:
    return ["--dataplane", "fast", "--workers", "1", "--backend", "fake", "--no-auth",
            "--control-plane", cluster.server.url, "--join-token", token, "--ca-file", str(cluster.ca_cert),
            "--advertise", "127.0.0.1"]


async def until(probe: Callable[[], Awaitable[T | None]], limit_s: float, what: str) -> T:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {limit_s}s: {what}")


async def nodes(cluster: Cluster) -> list[dict[str, Any]]:
    r = await cluster.admin.get("/admin/nodes")
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def table_urls(cluster: Cluster) -> dict[str, str]:
    r = await cluster.admin.get("/v1/table")
    assert r.status_code == 200, r.text
    return {n["node_id"]: n["url"] for n in r.json()["nodes"]}


async def test_gazsi_edge_serve_joins_heartbeats_and_leaves(cluster: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    # Blocking start (it polls the edge's /readyz) off the loop: the control plane answers the join meanwhile.
    edge = await asyncio.to_thread(EdgeProcess, tmp_path / "edge", *edge_args(cluster, TOKEN))
    try:
        async def healthy() -> dict[str, Any] | None:
            return next((n for n in await nodes(cluster) if n["state"] == "healthy"), None)

        node = await until(healthy, 15, "the edge healthy in the registry")
        print(f"healthy in the registry {time.monotonic() - started:.1f}s after the CLI started")
        assert node["url"] == edge.url  # what it advertised: --advertise 127.0.0.1 and its data port
        assert node["dataplane"] == "fast" and node["engine_backend"] == "fake" and node["heartbeats"] >= 1
        node_id = node["node_id"]

        async def routed() -> dict[str, str] | None:
            urls = await table_urls(cluster)
            return urls if node_id in urls else None

        assert (await until(routed, 5, "the edge in the routing table"))[node_id] == edge.url
        r = await cluster.admin.get("/v1/route", params={"model": "all-MiniLM-L6-v2"})
        assert r.json() == {**r.json(), "url": edge.url, "node_id": node_id}
        # The edge knows itself by the id the control plane gave it, and says it joined.
        ready = (await asyncio.to_thread(httpx.get, edge.admin + "/readyz", timeout=5)).json()
        assert ready["node_id"] == node_id and ready["control_plane"]["state"] == "joined"
        # Heartbeats ride on a client certificate the operator's CA signed for this node id.
        cert = x509.load_pem_x509_certificate((tmp_path / "edge" / "node-certs" / "node.crt").read_bytes())
        ca = x509.load_pem_x509_certificate(cluster.ca_cert.read_bytes())
        assert cert.issuer == ca.subject
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == node_id
        before = node["heartbeats"]
        await asyncio.sleep(1.5)  # one heartbeat interval (1 s) and a half
        assert next(n["heartbeats"] for n in await nodes(cluster) if n["node_id"] == node_id) > before
    finally:
        code = await asyncio.to_thread(edge.stop)
    assert code == 0, "".join(edge.lines)
    # Its goodbye (a draining heartbeat) takes it out of the table at once, not after missed heartbeats.
    shown = (await cluster.admin.get(f"/admin/nodes/{node_id}")).json()
    assert shown["state"] == "draining"

    async def gone() -> bool | None:
        return True if node_id not in await table_urls(cluster) else None

    await until(gone, 2, "the stopped edge out of the routing table")


async def test_a_wrong_join_token_is_refused_and_the_edge_exits(cluster: Cluster, tmp_path: Path) -> None:
    wrong = "not-the-join-token-42"
    cmd = [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve",
           "--data-dir", str(tmp_path / "edge"), "--port", "0", *edge_args(cluster, wrong)]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                env=dict(os.environ))
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    print(f"edge exited {proc.returncode} after {time.monotonic() - started:.1f}s")
    # Refused, said once and clearly (no retry loop), and the process fails instead of serving outside the cluster.
    assert proc.returncode == 2, text
    assert text.count("the control plane refused to let this node join") == 1, text
    assert "invalid join token" in text and "--join-token" in text, text
    assert f"gazsi: error: the control plane at {cluster.server.url} refused this node" in text, text
    assert wrong not in text and TOKEN not in text  # tokens are secrets: never logged
    assert await nodes(cluster) == []
    cluster.server.cp.tick(force=True)  # publishes the registry's counters to /metrics
    metrics = (await cluster.admin.get("/metrics")).text
    assert 'gazsi_cp_rejected_total{reason="bad_token"} 1.0' in metrics, metrics
