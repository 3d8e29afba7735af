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
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gazsi_cli.local_ray import LocalRay, tail_lines
from gazsi_cli.ports import free_port
from gazsi_cluster.config import Settings, load_settings
from gazsi_cluster.errors import ConfigError, GazsiError, ServiceUnavailable

__all__ = ["register"]

_STATE = "up-state.json"


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="start the whole cluster on this machine (Ray + Serve + edges)")
    up.add_argument("--profile", choices=["cpu", "gpu"], help="default: gpu when a CUDA device is found")
    up.add_argument("--port", type=int, default=8000, help="Serve HTTP proxy port")
    up.add_argument("--edges", type=_positive, metavar="N",
                    help="edge replicas (default: the profile's; the GPU profile runs one per GPU)")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for the cluster to be healthy")
    up.add_argument("--data-dir", help="data directory (env GAZSI_DATA_DIR)")
    up.set_defaults(handler=_up)
    down = sub.add_parser("down", help="stop what `gazsi up` started")
    down.add_argument("--data-dir", help="data directory (env GAZSI_DATA_DIR)")
    down.set_defaults(handler=_down)
    status = sub.add_parser("status", help="nodes, replicas and health of the local cluster")
    status.add_argument("--data-dir", help="data directory (env GAZSI_DATA_DIR)")
    status.set_defaults(handler=_status)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": args.data_dir} if getattr(args, "data_dir", None) else {}
    return load_settings(args.config, **overrides)


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"`{name}` not found next to {sys.executable} or on PATH: pip install 'ray[serve]'")
    return found


def _gazsi_command() -> str:
    """How the user can call `gazsi` again: plain `gazsi` when that is this one on PATH, else its path
    (after `scripts/run`, `.venv/bin` is usually not on PATH)."""
    mine = Path(sys.executable).parent / "gazsi"
    on_path = shutil.which("gazsi")
    if on_path and mine.exists() and Path(on_path).resolve() == mine.resolve():
        return "gazsi"
    if mine.exists():
        with contextlib.suppress(ValueError):
            return "./" + str(mine.resolve().relative_to(Path.cwd().resolve()))
        return str(mine)
    return "gazsi"



def _say(msg: str) -> None:
    print(f"gazsi: {msg}", flush=True)


def _run(cmd: list[str], *, env: dict[str, str], check: bool = True, hint: str = "",
         timeout_s: float = 300, head: LocalRay | None = None) -> subprocess.CompletedProcess[str]:
    """Run a `ray`/`serve` command; on failure the error shows its last complete lines and `hint`.

    With `head`, the local Ray head is watched while the command runs: a `serve deploy` against a
    head that died would otherwise retry its GCS connection for a minute or more.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            out, err = proc.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            gone = head is not None and not head.alive()
            if gone or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                _check_head(head)
                raise ServiceUnavailable(f"`{_show(cmd)}` did not finish in {timeout_s:.0f}s. {hint}".rstrip()) from None
    if check and proc.returncode != 0:
        _check_head(head)
        detail = tail_lines(err or out) or "(no output)"
        raise ServiceUnavailable(f"`{_show(cmd)}` failed (exit {proc.returncode}):\n{detail}\n{hint}".rstrip())
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _show(cmd: list[str]) -> str:
    return " ".join([Path(cmd[0]).name, *cmd[1:3]]) + (" …" if len(cmd) > 3 else "")


def _serve_config(settings: Settings, profile: str, port: int, config_file: str | None,
                  local: bool = True, edges: int | None = None) -> dict[str, Any]:
    from importlib.resources import files

    base = yaml.safe_load(files("deployments").joinpath(f"{profile}.yaml").read_text())
    base.setdefault("http_options", {})["port"] = port
    if local:
        base["http_options"]["host"] = "127.0.0.1"  # one machine: nothing listens beyond loopback
    env = {k: v for k, v in os.environ.items() if k.startswith("GAZSI_")}
    env["GAZSI_DATA_DIR"] = str(settings.data_dir)
    if config_file:
        env["GAZSI_CONFIG"] = str(Path(config_file).resolve())
    for app in base["applications"]:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
        for dep in app.get("deployments", []):
            if dep.get("name") == "Edge" and edges:
                dep["num_replicas"] = edges
    return dict(base)


def _cpus_needed(config: dict[str, Any]) -> float:
    """Logical CPUs the config's replicas reserve: the local head offers at least that many, so a
    small machine still places every replica (they share its cores, as processes do)."""
    return sum(float(d.get("num_replicas", 1)) * float((d.get("ray_actor_options") or {}).get("num_cpus", 1))
               for app in config.get("applications", []) for d in app.get("deployments", []))


def _serve_status(address: str, env: dict[str, str], head: LocalRay | None = None) -> tuple[dict[str, Any], str]:
    """`serve status` as a dict, and the error text when it could not be read."""
    proc = _run([_bin("serve"), "status", "--address", address], env=env, check=False, timeout_s=60, head=head)
    if proc.returncode != 0:
        return {}, tail_lines(proc.stderr or proc.stdout, max_lines=4)
    try:
        data = yaml.safe_load(proc.stdout) or {}
    except yaml.YAMLError:
        return {}, "unreadable `serve status` output"
    return (data, "") if isinstance(data, dict) else ({}, "unreadable `serve status` output")


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


def _read_state(data_dir: Path) -> dict[str, Any]:
    path = data_dir / _STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _ray_env(state: dict[str, Any], data_dir: Path) -> dict[str, str]:
    """The env for `ray`/`serve` calls against the cluster `state` describes: the token of the
    head `up` started, or the user's own settings for a cluster they run (RAY_ADDRESS)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    if state.get("started_ray", True):
        env.update(LocalRay.for_data_dir(data_dir).client_env())
    return env


def _up(args: argparse.Namespace) -> int:
    from edge_node.hardware import cuda_device_count
    from gazsi_cli import embedded_redis
    from gazsi_cli.outside import prepare as prepare_outside

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    head = LocalRay.for_data_dir(settings.data_dir)
    previous = _read_state(settings.data_dir)
    if previous.get("started_ray") and head.alive():
        raise ConfigError(f"a cluster from {settings.data_dir} is already running: "
                          f"`{_gazsi_command()} status` shows it, `{_gazsi_command()} down` stops it")
    (settings.data_dir / _STATE).unlink(missing_ok=True)  # a stale state of a cluster that is gone
    profile = args.profile or ("gpu" if cuda_device_count() else "cpu")
    _say(f"profile {profile} (data in {settings.data_dir})")
    started = time.monotonic()
    local = not os.environ.get("RAY_ADDRESS")
    try:
        # issue 18: shared limits/budgets/key changes for every process of the cluster
        os.environ.update(embedded_redis.up_env(settings, local_cluster=local, say=_say))
        # issue 17: the HTTPS join API and the tunnel listener, for edges on other machines
        outside = prepare_outside(settings)
        os.environ.update(outside.env(settings))
        env = dict(os.environ, GAZSI_DATA_DIR=str(settings.data_dir), RAY_USAGE_STATS_ENABLED="0")
        edges = args.edges or (cuda_device_count() if profile == "gpu" else None)
        serve_config = _serve_config(settings, profile, args.port, args.config, local, edges)
        if local:
            dashboard, ray_address = _start_head(head, env, _cpus_needed(serve_config))
        else:
            dashboard = os.environ.get("GAZSI_RAY_DASHBOARD", "http://127.0.0.1:8265")
            ray_address = os.environ["RAY_ADDRESS"]
            _say(f"using the Ray cluster at {os.environ['RAY_ADDRESS']} (its own auth settings: "
                 "RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH as you set them)")
        (settings.data_dir / _STATE).write_text(json.dumps({
            "started_ray": local, "dashboard": dashboard, "port": args.port,
            "ray_temp_dir": head.temp_dir if local else None,
        }))
        config_path = settings.data_dir / f"serve-{profile}.yaml"
        config_path.write_text(yaml.safe_dump(serve_config))
        _say(f"deploying {config_path.name}…")
        _run([_bin("serve"), "deploy", str(config_path), "--address", dashboard], env=env,
             head=head if local else None,
             hint="Is the Ray dashboard reachable? For a cluster with token auth set RAY_AUTH_MODE=token "
                  "and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN).")
        gateway = f"http://127.0.0.1:{args.port}"
        _wait_healthy(dashboard, gateway, env, head if local else None, started, args.timeout)
        admin_key = asyncio.run(_ensure_admin_key(settings)) if settings.auth.enabled else None
    except BaseException:
        _undo(settings.data_dir, head if local else None)
        raise
    _say(f"up in {time.monotonic() - started:.0f}s")
    nodes, error = _edge_dataplanes(dict(env, RAY_ADDRESS=ray_address), args.config, head if local else None)
    for line in _dataplane_lines(nodes, error):
        _say(line)
    _print_welcome(settings, gateway, admin_key)
    outside.write(settings.data_dir)
    print()
    print("\n".join(outside.lines()))
    return 0


def _start_head(head: LocalRay, env: dict[str, str], cpus_needed: float) -> tuple[str, str]:
    """Start the local head; its dashboard URL (for `serve`) and GCS address (for Ray clients)."""
    head.ensure_token()
    env.update(head.env())
    gcs_port, dash_port, client_port = free_port(), free_port(), free_port()
    _say("starting a local Ray head (token auth, loopback only; takes a few seconds)…")
    # Ray always starts its client server when its deps are installed; a free port instead of the
    # fixed 10001 keeps it off a neighbour's cluster, and the marker env lets `down` find it (it
    # is not a child of the processes that name the temp dir, and outlived `ray stop` by a minute).
    _run([_bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
          "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--disable-usage-stats",
          f"--ray-client-server-port={client_port}", f"--temp-dir={head.temp_dir}",
          f"--num-cpus={max(os.cpu_count() or 1, math.ceil(cpus_needed))}"], env=env,
         hint=f"Ray's logs: {head.temp_dir}/session_latest/logs")
    return f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}"


def _undo(data_dir: Path, head: LocalRay | None) -> None:
    """After a failed or interrupted `up`: stop what it started, so nothing is left behind."""
    from gazsi_cli import embedded_redis

    if head is not None and head.stop():
        _say(f"stopped the local Ray head this `up` started (its logs stay in {head.temp_dir}/session_latest/logs)")
    if embedded_redis.stop(data_dir):
        _say("stopped the embedded Redis this `up` started")
    (data_dir / _STATE).unlink(missing_ok=True)


def _wait_healthy(dashboard: str, gateway: str, env: dict[str, str], head: LocalRay | None,
                  started: float, timeout_s: float) -> None:
    """Poll until Serve says RUNNING and the gateway routes to an edge, printing progress;
    fail fast when the local head dies or Serve cannot be read for a while."""
    deadline = started + timeout_s
    last, last_said, unreadable_since = "", 0.0, None
    while True:
        now = time.monotonic()
        _check_head(head)
        status, error = _serve_status(dashboard, env, head)
        if error:
            unreadable_since = unreadable_since or now
            if now - unreadable_since > 30:
                raise ServiceUnavailable(f"`serve status` failed for 30s:\n{error}")
        else:
            unreadable_since = None
        app = (status.get("applications") or {}).get("gazsi") or {}
        code, _ = _get(f"{gateway}/readyz")
        line = _progress(app, code == 200)
        if line != last or now - last_said >= 10:
            _say(f"[{now - started:4.0f}s] {line}")
            last, last_said = line, now
        if app.get("status") == "RUNNING" and code == 200:
            return
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServiceUnavailable(f"deployment failed: {app.get('message') or json.dumps(app)[:2000]}")
        if now > deadline:
            raise ServiceUnavailable(f"not healthy after {timeout_s:.0f}s: {line}")
        time.sleep(1.0)


def _check_head(head: LocalRay | None) -> None:
    if head is not None and not head.alive():
        raise ServiceUnavailable(f"the local Ray head exited during the deploy; its logs: "
                                 f"{head.temp_dir}/session_latest/logs")


def _progress(app: dict[str, Any], gateway_ready: bool) -> str:
    deployments = app.get("deployments") or {}
    parts = [f"{name} {d.get('status', '?')}" for name, d in sorted(deployments.items()) if isinstance(d, dict)]
    edge = deployments.get("Edge") or {}
    note = ""
    if isinstance(edge, dict) and edge.get("status") != "HEALTHY":
        note = " (edges load the model and warm up)"
    gw = "gateway ready" if gateway_ready else "gateway waiting for an edge"
    return f"serve {app.get('status', 'starting')}: {', '.join(parts) or 'starting'}{note}; {gw}"


def _edge_dataplanes(env: dict[str, str], config_file: str | None, head: LocalRay | None,
                     timeout_s: float = 30) -> tuple[list[dict[str, Any]], str]:
    """The edges the control plane lists (`gazsi nodes --ray --json list`), and the error text when
    they could not be read. A process of its own, like the `serve` calls: Ray's driver stays out of
    this one, and a control plane that does not answer costs at most ``timeout_s``."""
    cmd = [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning",
           *(["--config", config_file] if config_file else []), "nodes", "--ray", "--json", "list"]
    try:
        proc = _run(cmd, env=env, check=False, timeout_s=timeout_s, head=head)
    except GazsiError as exc:  # no answer in time, or the head died
        return [], exc.message.split("\n")[0]
    except OSError as exc:
        return [], str(exc)
    if proc.returncode != 0:
        return [], tail_lines(proc.stderr or proc.stdout, max_lines=2, max_chars=400) or f"exit {proc.returncode}"
    start = proc.stdout.find("{")  # the JSON document; anything a library printed before it is not
    try:
        rows = json.loads(proc.stdout[start:])["data"] if start >= 0 else None
    except (ValueError, KeyError, TypeError):
        rows = None
    if not isinstance(rows, list):
        return [], "unreadable `gazsi nodes --ray --json list` output"
    return [r for r in rows if isinstance(r, dict)], ""


def _dataplane_lines(nodes: list[dict[str, Any]], error: str = "") -> list[str]:
    """One line per edge: its data plane and why (what the node told the control plane when it joined)."""
    if error or not nodes:
        return [f"the edges' data planes could not be read: {error or 'the control plane lists no edges'}"]
    lines = []
    for node in sorted(nodes, key=lambda n: str(n.get("node_id"))):
        reason = node.get("dataplane_reason")
        state = node.get("state")
        lines.append(f"edge {node.get('node_id')} at {node.get('url')}: data plane {node.get('dataplane', '?')}"
                     + (f" ({reason})" if reason else "") + (f" [{state}]" if state and state != "healthy" else ""))
    return lines


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
    url = direct or gateway
    gazsi = _gazsi_command()
    print()
    _say("the cluster is up.")
    print(f"  gateway (Serve proxy):  {gateway}")
    if direct:
        print(f"  gateway (direct):       {direct}")
    if admin_key:
        print(f"\n  admin key (shown once, stored hashed): {admin_key}")
        # The examples read the key from the environment, so they work the same on every `up`.
        print(f"\n  export GAZSI_API_KEY={admin_key}")
    elif settings.auth.enabled:
        print(f"\n  an admin key exists already: export GAZSI_API_KEY=<that key> "
              f"(or make one: {gazsi} keys create --name NAME)")
    model = settings.engine.model
    print(f"""
  curl -s {url}/v1/embeddings -H "Authorization: Bearer $GAZSI_API_KEY" \\
       -H 'Content-Type: application/json' -d '{{"model": "{model}", "input": "hello world"}}'
  curl -s {url}/v1/route -H "Authorization: Bearer $GAZSI_API_KEY"    # the edge to call directly

  import os
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key=os.environ["GAZSI_API_KEY"])
  print(client.embeddings.create(model="{model}", input=["hello", "world"]).data[0].embedding[:4])

  status: {gazsi} status    stop it with: {gazsi} down""")


def _down(args: argparse.Namespace) -> int:
    from gazsi_cli import embedded_redis

    settings = _settings(args)
    state = _read_state(settings.data_dir)
    if not state:
        _say(f"nothing to stop: no cluster started by `gazsi up` from {settings.data_dir}")
        stopped_redis = embedded_redis.stop(settings.data_dir)  # left by an older version, if any
        if stopped_redis:
            _say("embedded Redis stopped")
        return 0
    env = _ray_env(state, settings.data_dir)
    head = LocalRay.for_data_dir(settings.data_dir) if state.get("started_ray") else None
    t0 = time.monotonic()
    if head is None or head.alive():
        proc = _run([_bin("serve"), "shutdown", "-y", "--address", state["dashboard"]], env=env, check=False,
                    timeout_s=120)
        if proc.returncode == 0:
            _say(f"Serve applications shut down ({time.monotonic() - t0:.1f}s: edges drain in-flight work)")
        else:
            _say(f"Serve shutdown failed (continuing):\n{tail_lines(proc.stderr or proc.stdout, max_lines=4)}")
    if head is not None:
        t1 = time.monotonic()
        stopped = head.stop(timeout_s=5.0)  # after Serve shut down nothing is left to lose; some Ray processes ignore SIGTERM
        _say(f"local Ray head stopped ({stopped} processes, {time.monotonic() - t1:.1f}s)" if stopped
             else "local Ray head was not running")
    if embedded_redis.stop(settings.data_dir):
        _say("embedded Redis stopped")
    (settings.data_dir / _STATE).unlink(missing_ok=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    state = _read_state(settings.data_dir)
    if not state:
        _say("not running (no `gazsi up` state in the data directory)")
        return 1
    status, error = _serve_status(state["dashboard"], _ray_env(state, settings.data_dir))
    if error:
        _say(f"Serve unreachable:\n{error}")
    print(yaml.safe_dump({"serve": status.get("applications", {})}, sort_keys=False).rstrip())
    code, ready = _get(f"http://127.0.0.1:{state.get('port', 8000)}/readyz")
    print(yaml.safe_dump({"gateway": ready if code else "unreachable"}, sort_keys=False).rstrip())
    return 0 if code == 200 else 1
