"""``gazsi edge serve``: run one edge node's data plane."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    edge = sub.add_parser("edge", help="run an edge node")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True, metavar="ACTION")
    serve = edge_sub.add_parser("serve", help="serve embeddings over HTTP (socket or gpu data plane, per edge.dataplane)")
    serve.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from config: 8000)")
    serve.add_argument("--dataplane", choices=["auto", "socket", "gpu", "gpunetio"], help="edge.dataplane")
    serve.add_argument("--backend", choices=["auto", "onnx-cpu", "torch-cuda", "tensorrt", "fake"])
    serve.add_argument("--data-dir", help="ONNX cache, key store, certificates (env GAZSI_DATA_DIR)")
    serve.add_argument("--no-auth", action="store_true", help="accept requests without a key (local testing)")
    serve.add_argument("--workers", type=int, help="0 = one FastAPI process; N = fast front with N HTTP workers")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from edge_node.dataplane.socket.app import create_app
    from edge_node.runtime import EdgeRuntime
    from gazsi_cluster.config import load_settings

    overrides: dict[str, Any] = {}
    edge: dict[str, Any] = {}
    if args.host:
        edge["host"] = args.host
    if args.port is not None:
        edge["port"] = args.port
    if args.dataplane:
        edge["dataplane"] = args.dataplane
    if args.workers is not None:
        edge["workers"] = args.workers
    if edge:
        overrides["edge"] = edge
    if args.backend:
        overrides["engine"] = {"backend": args.backend}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.no_auth:
        overrides["auth"] = {"enabled": False}
    settings = load_settings(args.config, **overrides)
    if args.log_level:
        settings.log_level = args.log_level
    if settings.edge.workers > 0 and settings.edge.dataplane in ("auto", "socket"):
        # Issue 8: N httptools worker processes + one engine process over a shared-memory ring.
        # Branch before anything probes CUDA: the engine process is forked, and a parent that
        # touched the CUDA driver leaves its forked children unable to use it.
        from edge_node.dataplane.fast import serve_fast

        return serve_fast(settings)
    runtime = EdgeRuntime(settings, authorizer=_authorizer(settings))
    from edge_node.hardware import choose_dataplane

    mode, reason = choose_dataplane(settings.edge.dataplane)
    print(f"gazsi edge: data plane {mode} ({reason})")
    if mode in ("gpu", "gpunetio"):
        # No DOCA receive path exists yet (docs/gpunetio.md): gpunetio runs the same GPU server
        # fed by the host socket feed.
        from edge_node.dataplane.gpu.server import serve_gpu

        return serve_gpu(settings, runtime)
    from gazsi_cluster.http.hardening import listener_options

    app = create_app(runtime)
    # Issue 9: header size/count, slowloris and per-address limits in the protocol; TLS when configured.
    options = listener_options(settings.limits, settings.edge.tls)
    scheme = "https" if settings.edge.tls.enabled else "http"
    print(f"gazsi edge: serving on {scheme}://{settings.edge.host}:{settings.edge.port} (model loads in the background)")
    uvicorn.run(
        app, host=settings.edge.host, port=settings.edge.port, log_level=settings.log_level,
        access_log=False, **options,
    )
    return 0


def _authorizer(settings: Any) -> Any:
    from gazsi_cluster.auth.factory import authorizer_for

    return authorizer_for(settings)
