"""Run an ASGI app with uvicorn inside the current event loop (Serve replicas, tests, benchmarks).

Serve replicas start their own listeners this way: the edge's data plane and the gateway's
direct listener must not depend on Ray's HTTP proxy for per-request traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Any

__all__ = ["RunningServer", "start_server"]


@dataclass
class RunningServer:
    server: Any
    task: asyncio.Task[None]
    sock: socket.socket
    host: str
    port: int

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the socket."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self.task, timeout_s)
        self.sock.close()


async def start_server(
    app: Any, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False, **uvicorn_options: Any
) -> RunningServer:
    """Bind ``host:port`` (0 = a free port), serve ``app`` and return once it accepts connections."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    options: dict[str, Any] = {"log_level": "warning", "access_log": False, "lifespan": "on",
                               "timeout_keep_alive": 30}
    options.update(uvicorn_options)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        sock.close()
        task.result()  # surface start-up errors
        raise RuntimeError("uvicorn exited during start-up")
    return RunningServer(server, task, sock, host, int(sock.getsockname()[1]))
