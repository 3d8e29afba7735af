"""The detached, named control-plane actor on a real local Ray, inside a private network namespace.

The test re-executes itself under ``unshare -n`` (only ``lo`` up), so Ray can reach nothing
but loopback, and it checks that every socket Ray listens on is a loopback address.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ray_env import fresh_home_env, require_own_home
from tests.support.required import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

_INSIDE = "GAZSI_TEST_IN_NETNS"


def test_ray_actor_in_private_netns() -> None:
    if shutil.which("unshare") is None:
        unavailable("unshare is missing: Ray's network cannot be isolated")
    here = Path(__file__).resolve()
    cmd = (f"ip link set lo up && {_INSIDE}=1 {sys.executable} -m pytest -q -p no:cacheprovider "
           f"'{here}::test_actor_inside' -o addopts='' --timeout 200")
    # ray.init(address="local") writes a token to ~/.ray: give it a HOME of its own, never the user's.
    proc = subprocess.run(["unshare", "-n", "bash", "-c", cmd], capture_output=True, text=True, timeout=230,
                          cwd=here.parents[3], env=fresh_home_env())
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        unavailable(f"unshare -n is not permitted here: {proc.stderr[:300]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


@pytest.mark.netns_inner  # collected only inside the namespace (tests/conftest.py deselects it outside)
def test_actor_inside(tmp_path: Path) -> None:
    import asyncio
    import ipaddress

    import psutil
    import ray

    from control_plane.actor import ACTOR_NAME, NAMESPACE, get_or_create_control_plane
    from edge_node.agent import RayLink
    from gazsi_cluster.config import load_settings
    from tests.support.agents import agent_for_link

    require_own_home()  # ray.init(address="local") writes ~/.ray/auth_token: never into the user's HOME
    settings = load_settings(data_dir=str(tmp_path), control_plane={"join_token": "t0k"})
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", namespace=NAMESPACE,
             num_cpus=2, log_to_driver=False)
    try:
        handle = get_or_create_control_plane(settings)
        assert ray.get(handle.ready.remote(), timeout=60)["nodes"] == 0
        same = get_or_create_control_plane(settings)  # get, not create a second one
        assert same._actor_id == handle._actor_id
        assert ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)._actor_id == handle._actor_id

        async def edge_side() -> None:
            agent = agent_for_link(settings, RayLink(handle), "ray-edge", 9000)
            await agent.beat()
            await agent.beat()
            assert "ray-edge" in agent.table.by_id

        async def refused_edge() -> None:
            # A wrong token through the actor: Ray wraps the error, the agent still sees a refusal (no retry
            # loop) and keeps the control plane's own words, not the remote traceback.
            refusals: list[Exception] = []
            agent = agent_for_link(settings, RayLink(handle), "ray-wrong-token", 9001, token="wrong", interval_s=0.05)
            agent.on_refused = refusals.append
            await agent.start()
            for _ in range(200):
                if refusals:
                    break
                await asyncio.sleep(0.05)
            await agent.stop()
            assert agent.state == "refused" and [str(e) for e in refusals] == ["invalid join token"]

        asyncio.run(edge_side())
        asyncio.run(refused_edge())
        nodes = ray.get(handle.list_nodes.remote())
        assert [(n["node_id"], n["state"]) for n in nodes] == [("ray-edge", "healthy")]
        with pytest.raises(ray.exceptions.RayTaskError, match="invalid join token"):
            ray.get(handle.join.remote({"address": "x", "port": 1, "engine_backend": "f", "models": ["m"],
                                        "max_batch_size": 1, "version": "v"}, "wrong"))
        # Ray must listen on loopback only.
        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert listening, "no listening sockets found"
        def loopback(ip: str) -> bool:
            addr = ipaddress.ip_address(ip)
            mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
            return addr.is_loopback or (mapped is not None and mapped.is_loopback)

        assert all(loopback(ip) for ip in listening), f"Ray listens beyond loopback: {listening}"
        ray.kill(handle)
    finally:
        ray.shutdown()
