"""A FakeEngine edge node on loopback, on any transport, with tight listener limits."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.config import Settings, load_settings
from tests.support.edge import running_node

# Small limits so each one is reached with a few bytes or a fraction of a second.
TIGHT_LIMITS: dict[str, Any] = {
    "max_headers": 20, "max_header_bytes": 2048, "header_timeout_s": 0.5, "body_timeout_s": 0.5,
    "keep_alive_timeout_s": 0.5, "max_connections_per_client": 4, "max_inputs_per_request": 8,
    "max_input_chars": 1000, "max_body_bytes": 4096,
}


@asynccontextmanager
async def running_edge(
    tmp_path: Path, *, dataplane: str = "asgi", auth: bool = False, tls: dict[str, Any] | None = None,
    **extra: Any,
) -> AsyncIterator[tuple[EdgeNode, Settings]]:
    """A FakeEngine edge on loopback, on the given transport, with tight listener limits.

    One worker on the fast front, so per-connection limits are the node's own (they are per worker).
    """
    authorizer = None
    if auth:
        from gazsi_cluster.auth.factory import build_authorizer

        authorizer = build_authorizer(load_settings(data_dir=str(tmp_path), auth={"key_env": "test"}))
    async with running_node(tmp_path, dataplane=dataplane, engine=FakeEngine(), workers=1, authorizer=authorizer,
                            limits=TIGHT_LIMITS, auth={"enabled": auth, "key_env": "test"},
                            edge={"tls": tls or {}}, **extra) as node:
        yield node, node.settings


def inputs_embedded(node: EdgeNode) -> float:
    """``gazsi_inputs_total`` over every process of the node (what reached the model)."""
    for line in node.render_metrics().decode().splitlines():
        if line.startswith("gazsi_inputs_total"):
            return float(line.split()[-1])
    return 0.0


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
