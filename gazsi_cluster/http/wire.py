"""What every transport hands the request pipeline, what it gets back, and the one HTTP/1.1 renderer.

A transport (uvicorn/ASGI, the fast front's httptools workers, the GPU data plane, a reverse
tunnel) only moves bytes: it builds an :class:`HttpRequest`, awaits a handler, and writes the
:class:`HttpReply` with :func:`render` (or, for a streamed body, :func:`render_head` and
:func:`render_chunk`). Because every byte-level transport writes through this module, the same
request gets the same bytes on each of them; the ASGI transport hands the same status, headers and
body to uvicorn.

>>> render(HttpReply(200, b'{"ok":true}'), keep_alive=True)[:17]
b'HTTP/1.1 200 OK\\r\\n'
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "Handler",
    "HttpReply",
    "HttpRequest",
    "render",
    "render_chunk",
    "render_head",
    "split_target",
]

JSON = "application/json"
_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
_REASONS[499] = b"Client Closed Request"
_LAST_CHUNK = b"0\r\n\r\n"


@dataclass(slots=True)
class HttpRequest:
    """One parsed HTTP request. Header names are lower-case; a repeated header keeps its last value."""

    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    client: str | None = None
    # time.perf_counter() when the transport had the request (GAZSI's T0).
    received: float = field(default_factory=time.perf_counter)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(slots=True)
class HttpReply:
    """A response: status, body and extra headers (content-type and content-length are the renderer's).

    ``stream`` replaces ``body`` for a response sent as it is produced (server-sent events): the
    byte transports send it with chunked transfer coding, the ASGI one as a streaming response.
    """

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON
    stream: AsyncIterator[bytes] | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


Handler = Callable[[HttpRequest], Awaitable[HttpReply]]


def split_target(target: str) -> tuple[str, str]:
    """``/inference?d=x`` -> (``/inference``, ``d=x``)."""
    path, _, query = target.partition("?")
    return path or "/", query


def render_head(reply: HttpReply, *, keep_alive: bool) -> bytes:
    """Status line and headers, in one fixed order: content-type, length (or chunked), extras, connection."""
    if reply.stream is None and not reply.headers and keep_alive and reply.content_type == JSON:
        # Most replies of a busy node (issue 13: the list below cost a fast-front worker ~1 %); same bytes.
        return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (
            reply.status, _REASONS.get(reply.status, b"Unknown"), len(reply.body))
    lines = [b"HTTP/1.1 %d %s" % (reply.status, _REASONS.get(reply.status, b"Unknown")),
             b"content-type: " + reply.content_type.encode("latin-1")]
    if reply.stream is None:
        lines.append(b"content-length: %d" % len(reply.body))
    else:
        lines.append(b"transfer-encoding: chunked")
    lines += [f"{k.lower()}: {v}".encode("latin-1") for k, v in reply.headers]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def render(reply: HttpReply, *, keep_alive: bool) -> bytes:
    """The whole response of a reply without ``stream``."""
    return render_head(reply, keep_alive=keep_alive) + reply.body


def render_chunk(data: bytes) -> bytes:
    """One chunk of a streamed body; ``b""`` renders the last chunk."""
    if not data:
        return _LAST_CHUNK
    return b"%x\r\n" % len(data) + data + b"\r\n"
