"""Helpers for tests and benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gazsi_cluster.http.server import start_server

__all__ = ["serve_on_loopback"]


@contextlib.asynccontextmanager
async def serve_on_loopback(app: Any, **uvicorn_options: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port); yields the base URL.

    >>> async with serve_on_loopback(app) as url: ...  # doctest: +SKIP
    """
    running = await start_server(app, "127.0.0.1", 0, **uvicorn_options)
    try:
        yield f"http://127.0.0.1:{running.port}"
    finally:
        await running.stop()
