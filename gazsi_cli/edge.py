"""``gazsi edge serve``: run one edge node (the same :class:`~edge_node.node.EdgeNode` Serve replicas run)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    edge = sub.add_parser("edge", help="run an edge node")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True, metavar="ACTION")
    serve = edge_sub.add_parser("serve", help="serve embeddings over HTTP (fast front, FastAPI or GPU data plane)")
    serve.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="data port (default from config: 8000; 0 = any free port)")
    serve.add_argument("--admin-port", type=int, help="operator port of the fast/gpu data planes (default port+1)")
    serve.add_argument("--dataplane", choices=["auto", "fast", "asgi", "gpu", "gpunetio"], help="edge.dataplane")
    serve.add_argument("--workers", type=int, help="fast data plane: HTTP worker processes (0 = from the CPUs)")
    serve.add_argument("--backend", choices=["auto", "onnx-cpu", "torch-cuda", "tensorrt", "fake"])
    serve.add_argument("--data-dir", help="ONNX cache, key store, certificates (env GAZSI_DATA_DIR)")
    serve.add_argument("--no-auth", action="store_true", help="accept requests without a key (local testing)")
    serve.add_argument("--control-plane", metavar="URL", help="join this control plane over HTTPS (control_plane.url)")
    serve.add_argument("--join-token", help="the cluster's join token (control_plane.join_token)")
    serve.add_argument("--ca-file", help="cluster CA certificate to verify the control plane (control_plane.ca_file)")
    serve.add_argument("--advertise", help="address clients and peers reach this node at (default: --host)")
    serve.add_argument("--tunnel", metavar="HOST:PORT",
                       help="reach this node through a reverse tunnel to the gateway tier's tunnel listener (for a "
                            "node behind NAT; edge.reach=tunnel, edge.tunnel.url)")
    serve.add_argument("--region", help="edge.region")
    serve.add_argument("--zone", help="edge.zone")
    serve.add_argument("--llm", action="append", default=[], metavar="NAME=URL",
                       help="serve chat/completions model NAME from the OpenAI-compatible server at URL "
                       "(llama.cpp server, vLLM, Ollama); repeatable; adds to edge.models")
    serve.set_defaults(handler=_serve)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    edge = {k: v for k, v in {
        "host": args.host, "port": args.port, "admin_port": args.admin_port, "dataplane": args.dataplane,
        "workers": args.workers, "region": args.region, "zone": args.zone,
    }.items() if v is not None}
    if args.tunnel:
        edge.update(reach="tunnel", tunnel={"url": args.tunnel})
    cp = {k: v for k, v in {"url": args.control_plane, "join_token": args.join_token,
                            "ca_file": args.ca_file}.items() if v is not None}
    out: dict[str, Any] = {}
    if args.llm:
        edge["models"] = [_llm_model(spec) for spec in args.llm]
    if edge:
        out["edge"] = edge
    if cp:
        out["control_plane"] = cp
    if args.backend:
        out["engine"] = {"backend": args.backend}
    if args.data_dir:
        out["data_dir"] = args.data_dir
    if args.no_auth:
        out["auth"] = {"enabled": False}
    return out


def _llm_model(spec: str) -> dict[str, str]:
    """``NAME=URL`` as an ``edge.models`` entry (kind chat: chat and completions)."""
    name, sep, url = spec.partition("=")
    if not sep or not name or not url:
        raise SystemExit(f"gazsi edge serve: --llm wants NAME=URL, got {spec!r}")
    return {"name": name, "kind": "chat", "url": url}


def _serve(args: argparse.Namespace) -> int:
    from gazsi_cluster.config import load_settings

    settings = load_settings(args.config, **_overrides(args))
    if args.log_level:
        settings.log_level = args.log_level
    # The node process follows log_level (file, GAZSI_LOG_LEVEL or --log-level), as its workers do.
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run(settings, args.advertise))
    else:
        uvloop.run(_run(settings, args.advertise))
    return 0


async def _run(settings: Any, advertise: str | None) -> None:
    from edge_node.node import EdgeNode
    from gazsi_cluster.errors import GazsiError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = EdgeNode(settings, advertise=advertise)
    print(f"gazsi edge: data plane {node.dataplane} ({node.dataplane_reason})", flush=True)
    async with node:
        ops = f"; operator app (/readyz, /metrics, /admin) on port {node.admin_port}" if node.ops else ""
        print(f"gazsi edge: serving on {node.url}{ops}; the model loads in the background", flush=True)
        if node.agent is not None:
            print(f"gazsi edge: joining the control plane at {settings.control_plane.url}", flush=True)
        if settings.edge.reach == "tunnel":
            print(f"gazsi edge: reached through a reverse tunnel to {settings.edge.tunnel.url} (after the join)",
                  flush=True)
        # A signal, or a control plane that refused this node: a node asked to join a cluster that will not
        # have it must not carry on as if it were a member.
        stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(node.wait_failed())
        await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, failed):
            task.cancel()
        print("gazsi edge: draining (in-flight requests finish, then the node stops)", flush=True)
    if node.failure is not None:
        raise GazsiError(f"the control plane at {settings.control_plane.url} refused this node: "
                         f"{node.failure.message}")
