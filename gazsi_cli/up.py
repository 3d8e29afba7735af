"""``gazsi up`` / ``gazsi down`` / ``gazsi status``: the whole cluster on one machine.

``up`` starts a local Ray head (or uses ``RAY_ADDRESS``), deploys the CPU or GPU Serve profile
from ``deployments/`` with ``serve deploy``, waits until the gateway routes to a healthy edge,
creates an admin key on first run (printed once, stored hashed) and prints how to call it.
This module is a composition root: it imports the outer packages inside its handlers only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gazsi_cluster.config import Settings, load_settings
from gazsi_cluster.errors import ConfigError, ServiceUnavailable

__all__ = ["ray_temp_dir", "register", "stop_local_ray"]

_STATE = "up-state.json"


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="start the whole cluster on this machine (Ray + Serve + edges)")
    up.add_argument("--profile", choices=["cpu", "gpu"], help="default: gpu when a CUDA device is found")
    up.add_argument("--port", type=int, default=8000, help="Serve HTTP proxy port")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for the cluster to be healthy")
    up.add_argument("--data-dir", help="data directory (env GAZSI_DATA_DIR)")
    up.set_defaults(handler=_up)
    down = sub.add_parser("down", help="stop what `gazsi up` started")
    down.add_argument("--data-dir", help="data directory (env GAZSI_DATA_DIR)")
    down.set_defaults(handler=_down)
    status = sub.add_parser("status", help="nodes, replicas and health of the local cluster")
    status.add_argument("--data-dir", help="data directory (env GAZSI_DATA_DIR)")
    status.set_defaults(handler=_status)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": args.data_dir} if getattr(args, "data_dir", None) else {}
    return load_settings(args.config, **overrides)


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"`{name}` not found next to {sys.executable} or on PATH: pip install 'ray[serve]'")
    return found


def ray_temp_dir(data_dir: Path) -> str:
    """The Ray temp dir of the head `up` starts: short (Ray's socket paths must stay < 108 bytes)
    and unique per data directory, so `down` can find exactly the processes it started."""
    import hashlib

    return f"/tmp/gazsi-ray-{hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]}"


def stop_local_ray(temp_dir: str, timeout_s: float = 15.0) -> int:
    """Stop the Ray processes started with ``--temp-dir=temp_dir`` and their children.

    Unlike ``ray stop``, which ends every Ray process on the machine, this leaves other Ray
    clusters (a user's own, a neighbour's test) alone.
    """
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                roots.append(proc)
    procs: dict[int, psutil.Process] = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in root.children(recursive=True)})
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(msg: str) -> None:
    print(f"gazsi: {msg}", flush=True)


def _run(cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> str:
    # Ray 2.5x clusters require a token; the CLI only sends the one `ray start` saved under
    # ~/.ray when told the cluster uses token auth.
    env = dict(env or os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise ServiceUnavailable(f"`{' '.join(cmd[:3])} …` failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def _serve_config(settings: Settings, profile: str, port: int, config_file: str | None) -> dict[str, Any]:
    from importlib.resources import files

    base = yaml.safe_load(files("deployments").joinpath(f"{profile}.yaml").read_text())
    base.setdefault("http_options", {})["port"] = port
    env = {k: v for k, v in os.environ.items() if k.startswith("GAZSI_")}
    env["GAZSI_DATA_DIR"] = str(settings.data_dir)
    if config_file:
        env["GAZSI_CONFIG"] = str(Path(config_file).resolve())
    for app in base["applications"]:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    return dict(base)


def _serve_status(address: str) -> dict[str, Any]:
    out = _run([_bin("serve"), "status", "--address", address], check=False)
    try:
        data = yaml.safe_load(out) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    import httpx

    try:
        r = httpx.get(url, headers=headers, timeout=5)
    except httpx.HTTPError:
        return 0, None
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def _up(args: argparse.Namespace) -> int:
    from edge_node.hardware import cuda_device_count

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    profile = args.profile or ("gpu" if cuda_device_count() else "cpu")
    _say(f"profile {profile} (data in {settings.data_dir})")
    state_path = settings.data_dir / _STATE
    from gazsi_cli import embedded_redis  # issue 18: shared limits/budgets/key changes for every process

    os.environ.update(embedded_redis.up_env(settings, local_cluster=not os.environ.get("RAY_ADDRESS"), say=_say))
    env = dict(os.environ, GAZSI_DATA_DIR=str(settings.data_dir), RAY_USAGE_STATS_ENABLED="0")
    started_ray = False
    if os.environ.get("RAY_ADDRESS"):
        dashboard = os.environ.get("GAZSI_RAY_DASHBOARD", "http://127.0.0.1:8265")
        _say(f"using the Ray cluster at {os.environ['RAY_ADDRESS']}")
    else:
        gcs_port, dash_port = _free_port(), _free_port()
        _say("starting a local Ray head (takes a few seconds)…")
        _run([_bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
              "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--disable-usage-stats",
              f"--temp-dir={ray_temp_dir(settings.data_dir)}"], env=env)
        started_ray = True
        dashboard = f"http://127.0.0.1:{dash_port}"
    state_path.write_text(json.dumps({
        "started_ray": started_ray, "dashboard": dashboard, "port": args.port,
        "ray_temp_dir": ray_temp_dir(settings.data_dir) if started_ray else None,
    }))
    config_path = settings.data_dir / f"serve-{profile}.yaml"
    config_path.write_text(yaml.safe_dump(_serve_config(settings, profile, args.port, args.config)))
    _say(f"deploying {config_path.name} (model load and warm-up take tens of seconds)…")
    _run([_bin("serve"), "deploy", str(config_path), "--address", dashboard], env=env)
    gateway = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + args.timeout
    last = ""
    while True:
        status = _serve_status(dashboard)
        app = (status.get("applications") or {}).get("gazsi") or {}
        code, _ = _get(f"{gateway}/readyz")
        line = f"serve: {app.get('status', 'starting')}; gateway: {'ready' if code == 200 else 'waiting for an edge'}"
        if line != last:
            _say(line)
            last = line
        if app.get("status") == "RUNNING" and code == 200:
            break
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServiceUnavailable(f"deployment failed: {json.dumps(app)[:2000]}")
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"not healthy after {args.timeout:.0f}s: {line}")
        time.sleep(1.0)
    admin_key = asyncio.run(_ensure_admin_key(settings)) if settings.auth.enabled else None
    _print_welcome(settings, gateway, admin_key)
    return 0


async def _ensure_admin_key(settings: Settings) -> str | None:
    from gazsi_cluster.auth.admin import KeyAdmin
    from gazsi_cluster.auth.factory import build_key_admin_parts

    store, redis = build_key_admin_parts(settings)
    await store.start()
    try:
        admin = KeyAdmin(store, env=settings.auth.key_env, redis=redis)
        if any(k.is_admin() and k.revoked_at is None for k in await admin.list_keys()):
            return None
        created = await admin.create(name="admin (gazsi up)", admin=True)
        return created.key
    finally:
        await store.close()
        if redis is not None:
            await redis.aclose()


def _print_welcome(settings: Settings, gateway: str, admin_key: str | None) -> None:
    direct = f"http://{settings.gateway.host}:{settings.gateway.port}" if settings.gateway.port else None
    key = admin_key or "$GAZSI_API_KEY"
    print()
    _say("the cluster is up.")
    print(f"  gateway (Serve proxy):  {gateway}")
    if direct:
        print(f"  gateway (direct):       {direct}")
    print(f"  edge for you:           curl -s -H 'Authorization: Bearer {key}' {gateway}/v1/route")
    if admin_key:
        print(f"\n  admin key (shown once, stored hashed): {admin_key}")
    elif settings.auth.enabled:
        print("\n  an admin key exists already; make more with `gazsi keys create --name NAME`")
    print(f"""
  curl -s {direct or gateway}/v1/embeddings -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' -d '{{"model": "{settings.engine.model}", "input": "hello world"}}'

  from openai import OpenAI
  client = OpenAI(base_url="{direct or gateway}/v1", api_key="{key}")
  print(client.embeddings.create(model="{settings.engine.model}", input=["hello", "world"]).data[0].embedding[:4])

  stop it with: gazsi down""")


def _down(args: argparse.Namespace) -> int:
    settings = _settings(args)
    state_path = settings.data_dir / _STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    dashboard = state.get("dashboard", "http://127.0.0.1:8265")
    _run([_bin("serve"), "shutdown", "-y", "--address", dashboard], check=False)
    _say("Serve applications shut down")
    if state.get("started_ray") and state.get("ray_temp_dir"):
        stopped = stop_local_ray(state["ray_temp_dir"])
        _say(f"local Ray head stopped ({stopped} processes)")
    from gazsi_cli import embedded_redis

    if embedded_redis.stop(settings.data_dir):
        _say("embedded Redis stopped")
    state_path.unlink(missing_ok=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    state_path = settings.data_dir / _STATE
    if not state_path.exists():
        _say("not running (no `gazsi up` state in the data directory)")
        return 1
    state = json.loads(state_path.read_text())
    status = _serve_status(state["dashboard"])
    print(yaml.safe_dump({"serve": status.get("applications", {})}, sort_keys=False).rstrip())
    code, ready = _get(f"http://127.0.0.1:{state.get('port', 8000)}/readyz")
    print(yaml.safe_dump({"gateway": ready if code else "unreachable"}, sort_keys=False).rstrip())
    return 0 if code == 200 else 1
