"""The chart's outsideEdges material, used for real: an edge joins and serves through the tunnel (issue 17).

The Secrets `helm template` generated (the EC cluster CA with its key, the tunnel listener's certificate, the
join token) are laid out as the head pod sees them (the init container's copy of the CA into the data dir
included), the control plane and the gateway's tunnel hub start from the head's rendered GAZSI_* env, and the
real CLI joins with the command NOTES.txt prints. Two changes to the env, both because this is a shared
machine and not a pod: ports 0 instead of 8443/8444 (something else may hold them) and 127.0.0.1 instead of
0.0.0.0. No Kubernetes cluster is involved.
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from _chart import Render

from tests.support.edge import EdgeProcess
from tests.support.tunnel import start_gateway, stop_gateway, until

pytestmark = [pytest.mark.helm, pytest.mark.integration, pytest.mark.timeout(180)]

FULL = "gz-gazsi-cluster"
LOOPBACK_OVERRIDES = {"GAZSI_CONTROL_PLANE__PORT": "0", "GAZSI_CONTROL_PLANE__HOST": "127.0.0.1",
                      "GAZSI_GATEWAY__TUNNEL_HOST": "127.0.0.1"}


def _secret(objects: list[dict[str, Any]], name: str) -> dict[str, bytes]:
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name)
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def _lay_out_pod_files(objects: list[dict[str, Any]], root: Path) -> dict[str, str]:
    """The head's files under ``root``; returns the path prefixes of the pod -> where they are here."""
    tls, tunnel = _secret(objects, f"{FULL}-tls"), _secret(objects, f"{FULL}-tunnel-tls")
    token = _secret(objects, f"{FULL}-join-token")["join-token"]
    files = {"etc/tls/ca.crt": tls["ca.crt"], "etc/tls/tls.crt": tls["tls.crt"], "etc/tls/tls.key": tls["tls.key"],
             "etc/tunnel/tls.crt": tunnel["tls.crt"], "etc/tunnel/tls.key": tunnel["tls.key"],
             "etc/join/join-token": token,
             # What the head's init container copies out of the Secret (gazsi.headInitContainers).
             "data/gazsi/ca/ca.crt": tls["ca.crt"], "data/gazsi/ca/ca.key": tls["ca.key"]}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(data)
        path.chmod(0o600)
    return {"/etc/gazsi/tls": str(root / "etc/tls"), "/etc/gazsi/tunnel": str(root / "etc/tunnel"),
            "/etc/gazsi/join": str(root / "etc/join"), "/data/gazsi": str(root / "data/gazsi")}


async def test_chart_material_joins_an_edge_that_serves_through_the_tunnel(
    render: Render, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from control_plane.server import ControlPlaneServer
    from control_plane.service import ControlPlane
    from gazsi_cluster.config import load_settings

    objects = render(sets=["outsideEdges.enabled=true", "outsideEdges.hosts={127.0.0.1}"])
    prefixes = _lay_out_pod_files(objects, tmp_path / "pod")
    rc = next(o for o in objects if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    head_env = rc["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    for key in [k for k in os.environ if k.startswith("GAZSI_")]:
        monkeypatch.delenv(key)
    # Only what this feature renders (and the data dir): no database, Redis or admin key here.
    for item in head_env:
        name = item["name"]
        if name == "GAZSI_DATA_DIR" or (name.startswith(("GAZSI_CONTROL_PLANE__", "GAZSI_GATEWAY__TUNNEL"))
                                        and name != "GAZSI_CONTROL_PLANE__DATABASE_URL" and "value" in item):
            value = item["value"]
            for pod_path, here in prefixes.items():
                value = value.replace(pod_path, here)
            monkeypatch.setenv(name, LOOPBACK_OVERRIDES.get(name, value))
    monkeypatch.setenv("GAZSI_AUTH__ENABLED", "false")
    settings = load_settings()
    assert settings.control_plane.serve_https and settings.control_plane.join_token is None
    server = ControlPlaneServer(ControlPlane(settings))
    await server.start()
    gateway, hub, listener, url = await start_gateway(settings, lambda: server.cp.table)
    edge: EdgeProcess | None = None
    try:
        token = (Path(prefixes["/etc/gazsi/join"]) / "join-token").read_text()
        # The command NOTES.txt prints, with the files copied out of the Secrets.
        edge = await asyncio.to_thread(
            EdgeProcess, tmp_path / "edge", "--dataplane", "fast", "--workers", "1", "--no-auth",
            "--control-plane", f"https://127.0.0.1:{server.port}", "--ca-file", f"{prefixes['/etc/gazsi/tls']}/ca.crt",
            "--join-token", token, "--tunnel", f"127.0.0.1:{hub.port}")

        async def routed() -> str | None:
            return next((n.node_id for n in gateway.table().nodes if n.url.startswith("tunnel://")), None)

        try:
            node_id = await until(routed, 60, "the edge routable through its tunnel")
        except AssertionError:
            await asyncio.to_thread(edge.stop)
            rest = edge.proc.stdout.read() if edge.proc.stdout else ""
            raise AssertionError("".join(edge.lines) + rest) from None
        assert sorted(hub.tunnels) == [node_id]
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["via chart"]})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384, r.text
    finally:
        if edge is not None:
            await asyncio.to_thread(edge.stop)
        await stop_gateway(gateway, hub, listener)
        await server.stop()
