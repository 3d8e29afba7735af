"""Kill the detached control-plane actor under load and let Ray restart it (issue 9, faults).

`serve deploy` of the CPU profile (2 edges) on a loopback-only Ray, closed-loop load on the
gateway's direct listener, ``ray.kill(control_plane, no_restart=False)``; then measure how long
until the actor is back, the node list holds the same edges again and the gateway's table does.
Run by test_control_plane_restart.py inside ``unshare -n``; prints ``RESULT:{json}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import yaml

# The Serve scenario's helpers (ports, `ray`/`serve` CLI calls, config, key) are reused as is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploy._serve_scenario import (
    BIN,
    ENV,
    create_key,
    free_port,
    serve_config,
    sh,
)

from gazsi_cli.local_ray import ray_temp_dir, stop_local_ray
from tests.support.ray_env import require_own_home

EDGES = 2
WARM_S = 3.0          # load before the kill
AFTER_S = 3.0         # load after the gateway's table holds every edge again
RECOVER_LIMIT_S = 40.0


def wait_routable(dashboard: str, gateway: str, limit_s: float = 180) -> float:
    """Seconds until the gateway routes to every edge (its /readyz lists them).

    Cheaper than polling `serve status` every second (a whole CLI process each time, which
    slowed start-up by a minute on a loaded 2-core machine); that runs only now and then, to
    fail fast on DEPLOY_FAILED.
    """
    started = last_status = time.monotonic()
    seen: Any = None
    while time.monotonic() - started < limit_s:
        try:
            seen = httpx.get(f"{gateway}/readyz", timeout=3).json()
            if seen.get("edges", 0) >= EDGES:
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError) as exc:
            seen = repr(exc)
        if time.monotonic() - last_status > 15:
            last_status = time.monotonic()
            status = yaml.safe_load(sh(str(BIN / "serve"), "status", "--address", dashboard)) or {}
            app = (status.get("applications") or {}).get("gazsi") or {}
            if app.get("status") == "DEPLOY_FAILED":
                raise SystemExit(f"deploy failed: {json.dumps(app)[:3000]}")
        time.sleep(0.5)
    raise SystemExit(f"the gateway never routed to every edge; last /readyz: {seen}")


def connect_driver(namespace: str) -> None:
    import ray

    # On an overloaded runner the driver's first GCS lookup can time out; it is not the subject.
    for attempt in range(3):
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], namespace=namespace, log_to_driver=False)
            return
        except ConnectionError:
            if attempt == 2:
                raise
            time.sleep(2)


def actor_restarts(actor_id: str) -> tuple[str, int]:
    from ray.util.state import get_actor

    a = get_actor(actor_id, timeout=10)
    return (a.state, int(a.num_restarts or 0)) if a is not None else ("GONE", -1)


def healthy_ids(handle: Any) -> set[str]:
    import ray

    return {n["node_id"] for n in ray.get(handle.list_nodes.remote(), timeout=10) if n["state"] == "healthy"}


async def load_and_restart(gateway: str, key: str, handle: Any, edge_ids: set[str]) -> dict[str, Any]:
    import ray

    done: list[tuple[float, int]] = []  # (finish time, status) of every client request
    errors: list[str] = []
    marks: dict[str, float | None] = {}
    gateway_view: list[tuple[float, int, int]] = []  # (t, edges, table_version) seen on /readyz
    probe_errors: list[str] = []
    stop = asyncio.Event()
    actor_id = handle._actor_id.hex()

    async with httpx.AsyncClient(base_url=gateway, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:

        async def worker(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = await c.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": f"cp {i} {n}"})
                    status = r.status_code
                    if status != 200:
                        errors.append(f"{status}: {r.text[:200]}")
                except httpx.HTTPError as exc:  # a connection error is a failed request too
                    status = -1
                    errors.append(f"{type(exc).__name__}: {exc}")
                done.append((time.monotonic(), status))

        async def watch_gateway() -> None:
            async with httpx.AsyncClient(base_url=gateway, timeout=5) as probe:
                while not stop.is_set():
                    try:
                        ready = (await probe.get("/readyz")).json()
                    except httpx.HTTPError as exc:  # reported, but a probe is not client traffic
                        probe_errors.append(f"{type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.1)
                        continue
                    now, version = time.monotonic(), ready["table_version"]
                    # One actor's table versions only grow; the restarted actor numbers its tables
                    # from 0 again, so a drop means the gateway now follows the new actor.
                    if "table_reset" not in marks and gateway_view and version < max(v for _, _, v in gateway_view):
                        marks["table_reset"] = now
                    gateway_view.append((now, ready["edges"], version))
                    await asyncio.sleep(0.1)

        async def until(check: Any, limit_s: float) -> float | None:
            while time.monotonic() - marks["killed"] < limit_s:  # type: ignore[operator]
                try:
                    if await asyncio.to_thread(check):
                        return time.monotonic()
                except Exception:  # the actor is down or restarting: keep polling
                    pass
                await asyncio.sleep(0.25)
            return None

        async def killer() -> None:
            try:
                await asyncio.sleep(WARM_S)
                marks["killed"] = time.monotonic()
                # no_restart=False: Ray restarts the actor (max_restarts=-1) as after a crash.
                await asyncio.to_thread(ray.kill, handle, no_restart=False)
                marks["actor_back"] = await until(lambda: actor_restarts(actor_id) == ("ALIVE", 1),
                                                  RECOVER_LIMIT_S)
                marks["nodes_back"] = await until(lambda: healthy_ids(handle) == edge_ids, RECOVER_LIMIT_S)
                marks["gateway_back"] = await until(
                    lambda: "table_reset" in marks and gateway_view[-1][1] == EDGES, RECOVER_LIMIT_S)
                await asyncio.sleep(AFTER_S)
            finally:
                stop.set()

        await asyncio.gather(killer(), watch_gateway(), *[worker(i) for i in range(4)])
        metrics = (await c.get("/metrics")).text

    killed = marks["killed"]
    assert killed is not None
    recovered = marks.get("gateway_back") or marks.get("nodes_back")

    def since_kill(name: str) -> float | None:
        at = marks.get(name)
        return None if at is None else round(at - killed, 2)

    stale = re.search(r"^gazsi_routing_stale_table_total (\S+)$", metrics, re.M)
    after_kill = [v for v in gateway_view if v[0] >= killed]
    return {
        "ok": sum(1 for _, s in done if s == 200),
        "failed": sum(1 for _, s in done if s != 200),
        "errors": errors[:5],
        "ok_before_kill": sum(1 for t, s in done if s == 200 and t < killed),
        "ok_while_actor_down": sum(
            1 for t, s in done if s == 200 and killed <= t <= (marks.get("actor_back") or 1e18)),
        "ok_during_outage": sum(1 for t, s in done if s == 200 and killed <= t <= (recovered or 1e18)),
        "actor_back_s": since_kill("actor_back"),
        "nodes_back_s": since_kill("nodes_back"),
        "gateway_back_s": since_kill("gateway_back"),
        "gateway_min_edges_after_kill": min((e for _, e, _ in after_kill), default=None),
        "gateway_new_table_s": since_kill("table_reset"),
        "gateway_versions_after_kill": sorted({v for _, _, v in after_kill}),
        "stale_table_decisions": float(stale.group(1)) if stale else None,
        "readyz_probe_errors": probe_errors[:5],
    }


def main() -> None:
    require_own_home()  # run by its test (run_scenario gives it an empty HOME), never in the user's
    import ray

    from control_plane.actor import ACTOR_NAME, NAMESPACE

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gazsi-cp-restart-"))
    data_dir = work / "data"
    gcs, dash, proxy, gw = free_port(), free_port(), free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dash}"
    temp_dir = ray_temp_dir(work)  # so the end stops this cluster only, never a neighbour's
    sh(str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp_dir}")
    result: dict[str, Any] = {}
    try:
        config = serve_config(data_dir, proxy, gw)
        for dep in config["applications"][0]["deployments"]:
            if dep["name"] == "Edge":
                dep["num_replicas"] = EDGES
        cfg = work / "serve.yaml"
        cfg.write_text(yaml.safe_dump(config))
        sh(str(BIN / "serve"), "deploy", str(cfg), "--address", dashboard)
        gateway = f"http://127.0.0.1:{gw}"
        result["ready_after_s"] = round(wait_routable(dashboard, gateway), 1)
        key = asyncio.run(create_key(data_dir))

        # This cluster, never another Ray on the machine ("auto" and the state API pick any of them).
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        connect_driver(NAMESPACE)
        handle = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        # A heartbeat late on a loaded 2-core machine makes an edge suspect for a moment: start
        # from a node list where every edge is healthy, so recovery is measured against it.
        deadline = time.monotonic() + 30
        while len(edge_ids := healthy_ids(handle)) < EDGES and time.monotonic() < deadline:
            time.sleep(0.2)
        result["nodes_before"] = sorted(edge_ids)
        result["load"] = asyncio.run(load_and_restart(gateway, key, handle, edge_ids))
        after: list[dict[str, Any]] = ray.get(handle.list_nodes.remote(), timeout=30)
        result["nodes_after"] = sorted((n["node_id"], n["state"]) for n in after)
        result["actor_after"] = list(actor_restarts(handle._actor_id.hex()))
        result["same_actor_id"] = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)._actor_id == handle._actor_id
        result["table_after"] = httpx.get(f"{gateway}/readyz", timeout=10).json()
    except (Exception, SystemExit):  # still print a RESULT: the test shows the traceback instead of Ray's log tail
        result["error"] = traceback.format_exc()[-4000:]
    finally:
        ray.shutdown()  # disconnect the driver before its cluster goes away
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", dashboard], env=ENV,
                       capture_output=True, timeout=120)
        stop_local_ray(temp_dir)
    result["scenario_s"] = round(time.monotonic() - started, 1)
    print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
