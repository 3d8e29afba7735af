"""``gazsi nodes list|show|drain|remove``: the operator's view of the control plane.

Talks to the control plane's HTTPS admin API (``control_plane.url`` + ``admin_token``,
verified against ``control_plane.ca_file``), or with ``--ray`` to the detached actor of the
Ray cluster this process can connect to.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    nodes = sub.add_parser("nodes", help="list, inspect, drain or remove edge nodes")
    nodes.add_argument("--url", help="control plane URL (default: control_plane.url)")
    nodes.add_argument("--ray", action="store_true", help="talk to the control plane actor over Ray")
    nodes.add_argument("--json", action="store_true", help="print raw JSON")
    act = nodes.add_subparsers(dest="nodes_command", required=True, metavar="ACTION")
    act.add_parser("list", help="all nodes with state and load").set_defaults(handler=_handle)
    for name, text in (("show", "one node in detail"), ("drain", "stop new traffic to a node"),
                       ("remove", "forget a node")):
        p = act.add_parser(name, help=text)
        p.add_argument("node_id")
        p.set_defaults(handler=_handle)


def _https(args: argparse.Namespace, settings: Any) -> Any:
    import ssl

    import httpx

    from gazsi_cluster.errors import ConfigError, GazsiError

    cfg = settings.control_plane
    url = (args.url or cfg.url or "").rstrip("/")
    if not url:
        raise ConfigError("set control_plane.url (GAZSI_CONTROL_PLANE__URL) or pass --url")
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    headers = {"Authorization": f"Bearer {cfg.admin_token}"} if cfg.admin_token else {}
    method, path = {
        "list": ("GET", "/admin/nodes"), "show": ("GET", "/admin/nodes/{id}"),
        "drain": ("POST", "/admin/nodes/{id}/drain"), "remove": ("DELETE", "/admin/nodes/{id}"),
    }[args.nodes_command]
    path = path.replace("{id}", getattr(args, "node_id", ""))
    try:
        resp = httpx.request(method, url + path, headers=headers, verify=ctx, timeout=10)
    except httpx.HTTPError as exc:
        raise GazsiError(f"cannot reach the control plane at {url}: {exc}") from exc
    body = resp.json()
    if resp.status_code >= 400:
        raise GazsiError(body.get("error", {}).get("message", f"HTTP {resp.status_code}"))
    return body


def _ray(args: argparse.Namespace, settings: Any) -> Any:
    import ray

    from control_plane.actor import get_or_create_control_plane
    from gazsi_cli.local_ray import LocalRay

    if not os.environ.get("RAY_ADDRESS"):
        # The head `gazsi up` started from this data directory has a token of its own.
        os.environ.update(LocalRay.for_data_dir(settings.data_dir).client_env())
    ray.init(address="auto", namespace="gazsi", log_to_driver=False)
    handle = get_or_create_control_plane(settings)
    cmd = args.nodes_command
    if cmd == "list":
        return {"data": ray.get(handle.list_nodes.remote())}
    return ray.get(getattr(handle, cmd).remote(args.node_id))


def _print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("node_id", "state", "url", "region", "zone", "dataplane", "last_heartbeat_age_s")
    print("  ".join(f"{c:<22}" for c in (*cols, "queue")))
    for r in rows:
        print("  ".join(f"{r.get(c)!s:<22}" for c in cols) + f"  {r['load']['queue_depth']}")


def _handle(args: argparse.Namespace) -> int:
    from gazsi_cluster.config import load_settings

    settings = load_settings(args.config)
    body = _ray(args, settings) if args.ray else _https(args, settings)
    if args.json or args.nodes_command != "list":
        print(json.dumps(body, indent=2))
    else:
        _print_table(body["data"])
    return 0
