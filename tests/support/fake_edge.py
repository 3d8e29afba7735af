"""Fakes for tests and benchmarks: tiny edges on loopback that join and heartbeat in-process.

A :class:`FakeEdge` is an aiohttp server answering ``POST /v1/embeddings`` after ``delay_s``,
registered with a :class:`ControlPlane` and heartbeating from a task. ``kill()`` drops its
listener and connections and stops heartbeats at once, like a node losing power.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from control_plane.service import ControlPlane

__all__ = ["FakeEdge"]


class FakeEdge:
    def __init__(self, cp: ControlPlane, name: str, *, delay_s: float = 0.002, token: str | None = None) -> None:
        self.cp, self.name, self.delay_s, self.token = cp, name, delay_s, token
        self.served = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._beats: asyncio.Task[None] | None = None

    async def _embed(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(self.delay_s)
        self.served += 1
        return web.json_response({"object": "list", "node": self.name, "data": []})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self._embed)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1])
        facts = {"node_id": self.name, "address": "127.0.0.1", "port": self.port, "engine_backend": "fake",
                 "models": ["all-MiniLM-L6-v2"], "max_batch_size": 8, "version": "test"}
        self.cp.join(facts, self.token)
        self.cp.heartbeat(self.name, {})
        self._beats = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.cp.config.heartbeat_interval_s)
            self.cp.heartbeat(self.name, {"in_flight": 0})

    async def kill(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beats
            self._beats = None
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()
            self._runner = None

    stop = kill
