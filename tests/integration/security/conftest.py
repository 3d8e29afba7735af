"""A FakeEngine edge served by real uvicorn on loopback with the hardened listener options."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from edge_node.dataplane.socket.app import create_app
from edge_node.engines.fake import FakeEngine
from edge_node.runtime import EdgeRuntime
from gazsi_cluster.config import Settings, load_settings
from gazsi_cluster.http.hardening import listener_options
from gazsi_cluster.http.server import RunningServer, start_server

# Small limits so each one is reached with a few bytes or a fraction of a second.
TIGHT_LIMITS: dict[str, Any] = {
    "max_headers": 20, "max_header_bytes": 2048, "header_timeout_s": 0.5, "body_timeout_s": 0.5,
    "keep_alive_timeout_s": 0.5, "max_connections_per_client": 4, "max_inputs_per_request": 8,
    "max_input_chars": 1000, "max_body_bytes": 4096,
}


@asynccontextmanager
async def running_edge(
    tmp_path: Path, *, auth: bool = False, tls: dict[str, Any] | None = None, **extra: Any
) -> AsyncIterator[tuple[RunningServer, Settings, EdgeRuntime]]:
    settings = load_settings(
        data_dir=str(tmp_path), engine={"backend": "fake"}, limits=TIGHT_LIMITS,
        auth={"enabled": auth, "key_env": "test"}, edge={"tls": tls or {}}, **extra,
    )
    authorizer = None
    if auth:
        from gazsi_cluster.auth.factory import build_authorizer

        authorizer = build_authorizer(settings)
    runtime = EdgeRuntime(settings, engine=FakeEngine(), authorizer=authorizer)
    await runtime.start(wait=True)
    server = await start_server(create_app(runtime, manage_lifespan=False), "127.0.0.1", 0,
                                **listener_options(settings.limits, settings.edge.tls))
    try:
        yield server, settings, runtime
    finally:
        await server.stop(5)
        await runtime.stop()


def read_all(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes (bounded by ``timeout_s`` of silence)."""
    sock.settimeout(timeout_s)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


Opener = Callable[[], socket.socket]
