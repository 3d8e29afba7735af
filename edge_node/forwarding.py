"""Peer forwarding: an overloaded edge, or one without the requested model, hands the request
to a peer from its routing table instead of failing.

An ASGI middleware around the edge app: it runs the request locally first; when the answer is
429 ``overloaded``, 404 ``model_not_found`` or 503 it sends the same request (same key) to a
peer chosen by the routing client, excluding itself. ``X-Gazsi-Forwarded`` marks forwarded
requests so they are never forwarded twice (no loops). Error bodies are small, so only they
are buffered; good responses stream straight through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from gazsi_cluster.errors import GazsiError
from gazsi_cluster.routing.client import RoutingClient

__all__ = ["FORWARDED_HEADER", "PeerForwarding"]

log = logging.getLogger(__name__)

FORWARDED_HEADER = "x-gazsi-forwarded"
_FORWARD_CODES = {(429, "overloaded"), (404, "model_not_found"), (503, None)}
_PASS_HEADERS = ("authorization", "content-type", "x-gazsi-timing")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


def _should_forward(status: int, body: bytes) -> bool:
    if (status, None) in _FORWARD_CODES:
        return True
    try:
        code = orjson.loads(body)["error"]["code"]
    except Exception:
        return False
    return (status, code) in _FORWARD_CODES


class PeerForwarding:
    """``app = PeerForwarding(create_app(runtime), lambda: client, lambda: agent.node_id)``."""

    def __init__(self, app: Any, client: Callable[[], RoutingClient | None], self_id: Callable[[], str | None],
                 *, paths: tuple[str, ...] = ("/v1/embeddings",)) -> None:
        self.app, self._client, self._self_id, self.paths = app, client, self_id, paths
        self.forwarded = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        client = self._client()
        if client is None or FORWARDED_HEADER in headers:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        held: list[Message] = []
        status = 0

        async def capture(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                if status < 400:
                    await send(msg)
                else:
                    held.append(msg)
            elif held:
                held.append(msg)
            else:
                await send(msg)

        await self.app(scope, replay, capture)
        if not held:
            return
        error_body = b"".join(m.get("body", b"") for m in held[1:])
        if _should_forward(status, error_body) and await self._forward(scope, headers, body, client, send):
            return
        for msg in held:
            await send(msg)

    async def _forward(self, scope: Scope, headers: dict[str, str], body: bytes, client: RoutingClient,
                       send: Send) -> bool:
        me = self._self_id()
        try:
            model = orjson.loads(body).get("model")
        except Exception:
            model = None
        out = {k: v for k, v in headers.items() if k in _PASS_HEADERS}
        out[FORWARDED_HEADER] = me or "1"
        try:
            resp = await client.request("POST", scope["path"], content=body, headers=out,
                                        model=model if isinstance(model, str) else None,
                                        exclude={me} if me else ())
        except GazsiError as exc:
            log.info("no peer could take a forwarded request: %s", exc)
            return False
        self.forwarded += 1
        keep = [(k.encode(), v.encode()) for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")]
        keep.append((b"content-length", str(len(resp.content)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": keep})
        await send({"type": "http.response.body", "body": resp.content, "more_body": False})
        return True
