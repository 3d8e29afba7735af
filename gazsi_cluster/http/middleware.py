"""Pure-ASGI middleware shared by the edge and the gateway (no BaseHTTPMiddleware: it costs a task per request)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gazsi_cluster.errors import PayloadTooLarge
from gazsi_cluster.http.asgi import to_response

__all__ = ["BodyLimitMiddleware", "RequestObserver", "TimingMiddleware"]

RequestObserver = Callable[[str, int, float, float], None]  # (route, status, sent_at, received_at)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 before they are read into memory.

    ``max_bytes`` may be a callable, read per request, so a reconfigured limit applies at once.
    """

    def __init__(self, app: ASGIApp, max_bytes: int | Callable[[], int]) -> None:
        self.app = app
        self._max = max_bytes if callable(max_bytes) else (lambda: max_bytes)

    @property
    def max_bytes(self) -> int:
        return self._max()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
        seen = 0
        limit = self.max_bytes

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes", param=None)
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = to_response(PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes"))
        await response(scope, receive, send)


class TimingMiddleware:
    """Marks T0 on arrival (``scope["state"]["t0"]``) and reports route/status/send time per request."""

    def __init__(self, app: ASGIApp, observer: RequestObserver) -> None:
        self.app, self.observer = app, observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope.setdefault("state", {})["t0"] = t0
        status = 500
        finished = False

        async def observed_send(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.observer(path, status if finished else 499, time.perf_counter(), t0)
