"""What the CPU answers on the gpu data plane: the heads the kernels leave to it (parsed with the listener
limits, then :meth:`EdgePipeline.handle`, as the fast front's workers do), and every reply written through
the one renderer, so each carries the bytes the other transports send."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from gazsi_cluster.errors import GazsiError, InvalidRequest, PayloadTooLarge
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import HttpReply, HttpRequest, render, render_chunk, render_head

from ._head import parse_head

if TYPE_CHECKING:
    from edge_node.pipeline import EdgePipeline

    from .feed import FeedConnection

__all__ = ["error_response", "reply_whole", "send", "serve_cpu", "with_headers"]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(exc: BaseException, keep_alive: bool) -> bytes:
    return render(error_reply(exc), keep_alive=keep_alive)


def with_headers(response: bytes, headers: list[tuple[str, str]]) -> bytes:
    """A built response with ``headers`` where :func:`~gazsi_cluster.http.wire.render_head` writes them.

    The renderer's order is status, content-type, content-length, extra headers, connection; the build
    kernel writes all but the extras.

    >>> with_headers(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\n{}", [("X-Gazsi-Cache", "miss")])
    b'HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\nx-gazsi-cache: miss\\r\\n\\r\\n{}'
    """
    if not headers:
        return response
    at = response.index(b"\r\n", response.index(b"\r\ncontent-length: ") + 2)
    extra = b"".join(b"\r\n" + f"{k.lower()}: {v}".encode("latin-1") for k, v in headers)
    return response[:at] + extra + response[at:]


def reply_whole(conn: FeedConnection, request: HttpRequest, reply: HttpReply, keep: bool) -> None:
    """A reply with its whole body (or a HEAD's head alone) through the renderer, in one write."""
    keep = keep and not conn.draining
    head = render_head(reply, keep_alive=keep)
    conn.respond(head if request.method == "HEAD" else head + reply.body, keep)


async def send(conn: FeedConnection, request: HttpRequest, reply: HttpReply, keep: bool) -> None:
    """The reply through the one renderer: what :class:`~gazsi_cluster.http.listener.HttpListener` sends."""
    if reply.stream is None or request.method == "HEAD":
        reply_whole(conn, request, reply, keep)
        return
    keep = keep and not conn.draining
    stream = reply.stream
    try:
        conn.write(render_head(reply, keep_alive=keep))
        async for chunk in stream:
            if conn.closed:
                return
            if chunk:
                conn.write(render_chunk(chunk))
                if not conn.writable.is_set():
                    await conn.writable.wait()  # the client reads slowly: so do we
        conn.respond(render_chunk(b""), keep)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def serve_cpu(pipeline: EdgePipeline, conn: FeedConnection, head: bytes, t0_ns: int) -> None:
    """A head the kernels do not serve: parsed here, its body read, answered by the pipeline."""
    lim = conn.limits
    try:
        parsed = parse_head(head, max_headers=lim.max_headers, max_header_bytes=lim.max_header_bytes)
        if parsed.chunked:
            raise InvalidRequest("the gpu data plane does not take chunked request bodies: send Content-Length")
    except GazsiError as exc:
        conn.reject(exc)
        return
    request = HttpRequest(parsed.method, parsed.path, parsed.query, parsed.headers, b"", conn.client, t0_ns / 1e9)
    limit = pipeline.max_body_bytes
    if parsed.content_length > limit:
        # As the other listeners: the body is read and dropped, then 413 and the connection closes.
        await conn.read_body(parsed.content_length, keep=False)
        await send(conn, request, error_reply(PayloadTooLarge(f"request body exceeds {limit} bytes")), False)
        return
    if parsed.content_length:
        if parsed.expect_continue:
            conn.write(_CONTINUE)
        request.body = await conn.read_body(parsed.content_length)
    reply = await pipeline.handle(request)
    await send(conn, request, reply, parsed.keep_alive)
