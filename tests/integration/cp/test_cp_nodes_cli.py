"""`gazsi nodes list|show|drain|remove` against a live HTTPS control plane on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from control_plane.server import ControlPlaneServer
from control_plane.service import ControlPlane
from control_plane.state import NodeState
from edge_node.agent import EdgeAgent, HttpsLink
from gazsi_cluster.config import Settings
from tests.support.agents import agent_for_link

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def agent_for(settings: Settings, url: str, tmp: Path, name: str, port: int) -> EdgeAgent:
    link = HttpsLink(url, ca_file=tmp / "data" / "ca" / "ca.crt", cert_dir=tmp / name)
    return agent_for_link(settings, link, name, port, token="join-s3cret")


async def gazsi(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_nodes_cli_lists_shows_drains_and_removes(cp_settings: Settings, tmp_path: Path) -> None:
    server = ControlPlaneServer(ControlPlane(cp_settings))
    await server.start()
    try:
        agent = agent_for(cp_settings, server.url, tmp_path, "edge-cli", 9011)
        await agent.beat()
        await agent.start()  # keeps heartbeating: each CLI call starts a fresh Python (seconds)
        env = dict(
            os.environ,
            GAZSI_CONTROL_PLANE__URL=server.url,
            GAZSI_CONTROL_PLANE__CA_FILE=str(tmp_path / "data" / "ca" / "ca.crt"),
            GAZSI_CONTROL_PLANE__ADMIN_TOKEN="admin-s3cret",
            GAZSI_DATA_DIR=str(tmp_path / "cli-data"),
        )
        rc, out, err = await gazsi("nodes", "--json", "list", env=env)
        assert rc == 0, err
        listed = json.loads(out)
        nodes = listed["data"]
        assert [n["node_id"] for n in nodes] == ["edge-cli"]
        rc, out, err = await gazsi("nodes", "show", "edge-cli", env=env)
        assert rc == 0, err
        assert "edge-cli" in out
        rc, _, err = await gazsi("nodes", "drain", "edge-cli", env=env)
        assert rc == 0, err
        assert server.cp.registry.nodes["edge-cli"].state is NodeState.DRAINING
        await asyncio.sleep(1.5)  # heartbeats keep coming: an operator's drain must stick
        assert server.cp.registry.nodes["edge-cli"].state is NodeState.DRAINING
        await agent.stop(say_goodbye=False)
        rc, _, err = await gazsi("nodes", "remove", "edge-cli", env=env)
        assert rc == 0, err
        rc, _, err = await gazsi("nodes", "show", "nope", env=env)
        assert rc == 2
        assert "nope" in err
        # A wrong admin token is refused with a clear message, not a traceback.
        rc, _, err = await gazsi("nodes", "list", env={**env, "GAZSI_CONTROL_PLANE__ADMIN_TOKEN": "wrong"})
        assert rc == 2
        assert "Traceback" not in err
    finally:
        await agent.stop(say_goodbye=False)
        await server.stop()
