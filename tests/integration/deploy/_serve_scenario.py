"""`serve deploy` of the CPU profile on a loopback-only Ray, then traffic, then an edge killed under load.

Run by test_serve_deploy.py inside ``unshare -n``; prints ``RESULT:{json}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import httpx
import yaml

from gazsi_cli.local_ray import ray_temp_dir, stop_local_ray
from gazsi_cli.ports import free_port
from tests.support.ray_env import require_own_home, use_token_auth

BIN = Path(sys.executable).parent
# A user's own Ray cluster with token auth, set up the way the README says: RAY_AUTH_MODE=token
# and RAY_AUTH_TOKEN_PATH for `ray start`, `serve deploy` and this driver alike.
ENV = use_token_auth(Path(tempfile.mkdtemp(prefix="gazsi-ray-token-")))



def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr[-3000:]}")
    return proc.stdout


def serve_config(data_dir: Path, proxy_port: int, gateway_port: int) -> dict:
    config = yaml.safe_load(files("deployments").joinpath("cpu.yaml").read_text())
    config["http_options"]["port"] = proxy_port
    app = config["applications"][0]
    app["runtime_env"] = {"env_vars": {
        "GAZSI_DATA_DIR": str(data_dir), "GAZSI_GATEWAY__PORT": str(gateway_port),
        "GAZSI_ENGINE__ONNX_THREADS": "1",
    }}
    for dep in app["deployments"]:
        if dep["name"] == "Edge":
            dep["num_replicas"] = 2
            dep["ray_actor_options"]["num_cpus"] = 0.5
    return config


def wait_running(dashboard: str, gateway: str, edges: int, limit_s: float = 400) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        status = yaml.safe_load(sh(str(BIN / "serve"), "status", "--address", dashboard)) or {}
        app = (status.get("applications") or {}).get("gazsi") or {}
        if app.get("status") == "DEPLOY_FAILED":
            raise SystemExit(f"deploy failed: {json.dumps(app)[:3000]}")
        try:
            ready = httpx.get(f"{gateway}/readyz", timeout=3)
            if app.get("status") == "RUNNING" and ready.status_code == 200 and ready.json()["edges"] >= edges:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("cluster never became RUNNING with all edges routable")


async def create_key(data_dir: Path) -> str:
    from gazsi_cluster.auth.admin import KeyAdmin
    from gazsi_cluster.auth.factory import build_key_admin_parts
    from gazsi_cluster.config import load_settings

    store, _ = build_key_admin_parts(load_settings(data_dir=str(data_dir)))
    await store.start()
    try:
        return (await KeyAdmin(store, env="live").create(name="e2e")).key
    finally:
        await store.close()


async def load_while(gateway: str, key: str, action, *, seconds: float, check_edges: bool) -> dict:
    """Closed-loop load through the gateway; ``action`` runs (in a thread) a few seconds in.

    With ``check_edges`` it then measures how long until the gateway routes to one edge only.
    """
    ok = failed = 0
    errors: list[str] = []
    stop_at = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=gateway, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:

        async def worker(i: int) -> None:
            nonlocal ok, failed
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                r = await c.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": f"load {i} {n}"})
                if r.status_code == 200:
                    ok += 1
                else:
                    failed += 1
                    errors.append(f"{r.status_code}: {r.text[:200]}")

        async def actor() -> float | None:
            await asyncio.sleep(3)
            started = time.monotonic()
            await asyncio.to_thread(action)
            if not check_edges:
                return None
            while time.monotonic() < stop_at + 10:
                if (await c.get("/readyz")).json()["edges"] == 1:
                    return time.monotonic() - started
                await asyncio.sleep(0.1)
            return None

        results = await asyncio.gather(actor(), *[worker(i) for i in range(4)])
    return {"ok": ok, "failed": failed, "errors": errors[:5], "left_table_after_s": results[0]}


def main() -> None:
    require_own_home()  # run by its test (run_scenario gives it an empty HOME), never in the user's
    import ray

    work = Path(tempfile.mkdtemp(prefix="gazsi-e2e-"))
    data_dir = work / "data"
    gcs, dash, proxy, gw = free_port(), free_port(), free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dash}"
    temp_dir = ray_temp_dir(work)
    sh(str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp_dir}")
    result: dict = {}
    try:
        cfg = work / "serve.yaml"
        cfg.write_text(yaml.safe_dump(serve_config(data_dir, proxy, gw)))
        sh(str(BIN / "serve"), "deploy", str(cfg), "--address", dashboard)
        gateway, proxied = f"http://127.0.0.1:{gw}", f"http://127.0.0.1:{proxy}"
        result["ready_after_s"] = wait_running(dashboard, gateway, edges=2)
        key = asyncio.run(create_key(data_dir))
        auth = {"Authorization": f"Bearer {key}"}
        texts = ["hello world", "GAZSI serves embeddings at the edge."]
        body = {"model": "all-MiniLM-L6-v2", "input": texts, "encoding_format": "float"}
        result["no_key_status"] = httpx.post(f"{gateway}/v1/embeddings", json=body, timeout=30).status_code
        via_gateway = httpx.post(f"{gateway}/v1/embeddings", json=body, headers=auth, timeout=60)
        via_proxy = httpx.post(f"{proxied}/v1/embeddings", json=body, headers=auth, timeout=60)
        route = httpx.get(f"{gateway}/v1/route", headers=auth, timeout=10).json()
        direct = httpx.post(f"{route['url']}/v1/embeddings", json=body, headers=auth, timeout=60)
        result["statuses"] = [via_gateway.status_code, via_proxy.status_code, direct.status_code]
        result["embeddings"] = {
            "gateway": [d["embedding"] for d in via_gateway.json()["data"]],
            "proxy": [d["embedding"] for d in via_proxy.json()["data"]],
            "edge": [d["embedding"] for d in direct.json()["data"]],
        }
        result["route"] = route

        # This cluster's GCS, not "auto": "auto" reads /tmp/ray's cluster files, which other sessions' Rays (in
        # other namespaces, unreachable from here) also write; ray.init then hangs, list_actors refuses (2026-12-04).
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"  # the state API (list_actors) resolves it the same way
        ray.init(address=f"127.0.0.1:{gcs}", namespace="serve", log_to_driver=False)
        from ray.util.state import list_actors

        def edge_replicas() -> list:
            return [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                    if "Edge" in (a.class_name or "") and a.name]

        edges = edge_replicas()
        result["edge_replicas"] = len(edges)

        # A changed user_config, deployed under load, applies in place: no replica restarts,
        # no request lost, and the edges report the new batching rules.
        new_config = serve_config(data_dir, proxy, gw)
        for dep in new_config["applications"][0]["deployments"]:
            if dep["name"] == "Edge":
                dep["user_config"]["batcher"].update({"max_batch_size": 16, "max_wait_us": 1000})

        def redeploy() -> None:
            cfg.write_text(yaml.safe_dump(new_config))
            sh(str(BIN / "serve"), "deploy", str(cfg), "--address", dashboard)
            wait_running(dashboard, gateway, edges=2)

        result["reconfigure_load"] = asyncio.run(load_while(gateway, key, redeploy, seconds=10, check_edges=False))
        result["replicas_kept"] = sorted(a.name for a in edge_replicas()) == sorted(a.name for a in edges)
        result["edge_batcher_after"] = httpx.get(f"{route['url']}/readyz", timeout=10).json().get("batcher")

        def kill() -> None:
            ray.kill(ray.get_actor(edges[0].name, namespace="serve"), no_restart=True)

        result["load"] = asyncio.run(load_while(gateway, key, kill, seconds=14, check_edges=True))
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", dashboard], env=ENV,
                       capture_output=True, timeout=120)
        ray.shutdown()
        stop_local_ray(temp_dir)  # only this test's cluster, never a neighbour's
    print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
