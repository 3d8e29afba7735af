"""An HTTP/1.1 listener that only moves bytes: httptools parses, one :data:`~gazsi_cluster.http.wire.Handler`
answers, :mod:`gazsi_cluster.http.wire` renders. No ASGI framework on the hot path.

It enforces the public listener's limits itself (``LimitsConfig``), the same ones the uvicorn
listeners get from :mod:`gazsi_cluster.http.hardening`:

* header section over ``max_header_bytes`` or more than ``max_headers`` fields -> 431, close;
* headers not complete ``header_timeout_s`` after the connection opened or the request began -> 408;
* a body announced or grown over the handler's body limit -> 413 (in order, after earlier replies), close;
* no body bytes for ``body_timeout_s`` while a body is expected -> close;
* more than ``max_connections_per_client`` open connections from one address -> 429, close;
* at most ``max_pipelined_requests`` parsed and unanswered requests per connection: beyond that the
  connection stops being read until replies go out (backpressure, never an unbounded queue);
* idle keep-alive connections close after ``keep_alive_timeout_s``.

Replies go out in request order (pipelining-safe); a streamed reply (``HttpReply.stream``) is sent with
chunked coding and waits for the socket to drain (a slow client never makes the server buffer without
bound); a client that disconnects cancels its request's work. TLS comes from the ``ssl`` context
(asyncio's SSL transport). Modelled on uvicorn's protocol classes.

Timeouts are deadlines on the connection, checked by one sweep per listener every
``min(timeouts) / 4`` (at least 50 ms), not timers per request: arming and cancelling three
``call_later`` handles per request cost ~5 us of a fast-front worker's ~150 us (issue 13's profile).
A timeout fires up to one sweep late.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

import httptools

from gazsi_cluster.config import LimitsConfig
from gazsi_cluster.errors import (
    GazsiError,
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    TooManyConnections,
)
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import Handler, HttpReply, HttpRequest, render_chunk, render_head

__all__ = ["HttpListener", "bind_socket"]

log = logging.getLogger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound (not yet listening) TCP socket; ``reuse_port`` lets several processes share the port.

    A bound SO_REUSEPORT socket that never listens reserves the port number without receiving
    connections: a node holds one so that all its workers bind the same (possibly chosen) port.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# What a connection's deadline is for.
_NONE, _HEADERS, _BODY, _IDLE = 0, 1, 2, 3


class _Reject(Exception):
    def __init__(self, error: GazsiError) -> None:
        super().__init__(error.message)
        self.error = error


class HttpListener:
    """Serve ``handler`` on sockets; ``max_body`` is read per request (it may change at run time).

    >>> listener = HttpListener(pipeline.handle, settings.limits, max_body=lambda: 8 << 20)  # doctest: +SKIP
    >>> await listener.start(sock); ...; await listener.stop()                            # doctest: +SKIP
    """

    def __init__(self, handler: Handler, limits: LimitsConfig, *, ssl_context: ssl.SSLContext | None = None,
                 max_body: Callable[[], int] | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.ssl_context = ssl_context
        self.max_body = max_body or (lambda: self.limits.max_body_bytes)
        self.per_client: collections.Counter[str] = collections.Counter()
        self.connections: set[_Connection] = set()
        self.servers: list[asyncio.Server] = []
        self.draining = False
        self.all_closed = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on a bound socket (listening here); several sockets may share one listener."""
        loop = asyncio.get_running_loop()
        sock.listen(4096)
        server = await loop.create_server(lambda: _Connection(self), sock=sock, ssl=self.ssl_context,
                                          backlog=4096)
        self.servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._tick(), self._sweep)

    def _tick(self) -> float:
        lim = self.limits
        return max(0.05, min(lim.header_timeout_s, lim.body_timeout_s, lim.keep_alive_timeout_s) / 4)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c in self.connections if c.deadline_kind and now >= c.deadline]:
            conn.expired()
        self._sweeper = loop.call_later(self._tick(), self._sweep)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting; in-flight requests finish (bounded), each answered with ``connection: close``."""
        self.draining = True
        for server in self.servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            self.all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), timeout_s)
        for conn in list(self.connections):
            conn.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


class _Connection(asyncio.Protocol):
    """One client connection. Parsed requests wait in a bounded deque; one task answers them in order."""

    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        self.limits = listener.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None
        self.counted = False
        self.pending: collections.deque[tuple[HttpRequest, bool, GazsiError | None]] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.read_paused = False
        self.closing = False
        self.rejected = False
        # the request being parsed
        self.in_headers = False
        self.in_body = False
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.header_bytes = 0
        self.header_count = 0
        self.raw_header_bytes = 0
        self.too_large: GazsiError | None = None
        self.body_limit = 0  # the handler's body limit, read once per request
        self.started = 0.0
        # The one pending timeout (loop.time() seconds) and what it is for; the listener's sweep fires it.
        self.deadline = 0.0
        self.deadline_kind = _NONE

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) and peer else None
        cap = self.limits.max_connections_per_client
        if self.client is not None and cap:
            if self.listener.per_client[self.client] >= cap:
                self._reject(TooManyConnections(f"too many open connections from your address (limit {cap})",
                                                retry_after=1))
                return
            self.listener.per_client[self.client] += 1
            self.counted = True
        if self.listener.draining:
            self._close()
            return
        # The first request's headers must arrive in time even if the client sends nothing at all.
        self._expect(_HEADERS, self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline_kind = _NONE
        self.listener.connections.discard(self)
        if not self.listener.connections:
            self.listener.all_closed.set()
        if self.counted and self.client is not None:
            self.counted = False
            self.listener.per_client[self.client] -= 1
            if self.listener.per_client[self.client] <= 0:
                del self.listener.per_client[self.client]
        self.transport = None
        self.writable.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # a disconnect cancels the work in flight

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        try:
            self.parser.feed_data(data)
        except _Reject as rej:
            self._reject(rej.error)
            return
        except httptools.HttpParserUpgrade:
            self._reject(InvalidRequest("protocol upgrades are not supported"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__ or exc.__cause__
            self._reject(cause.error if isinstance(cause, _Reject) else InvalidRequest("Invalid HTTP request"))
            return
        # Deadlines only for a request this chunk left unfinished (most arrive whole: issue 13 counted three
        # deadline writes per request); one begun in this callback began now, as far as the sweep can tell.
        if self.in_headers:
            # httptools buffers a header line until its end: bound what it may hold. An upper bound
            # (the chunk that began the request may also hold the previous request's tail).
            self.raw_header_bytes += len(data)
            if self.raw_header_bytes > self.limits.max_header_bytes:
                self._reject(self._too_large_headers())
            elif self.deadline_kind != _HEADERS:  # a connection waiting for its first request keeps its deadline
                self._expect(_HEADERS, self.limits.header_timeout_s)
        elif self.in_body:  # restarted by every chunk of the body
            self._expect(_BODY, self.limits.body_timeout_s)

    # -- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_headers = True
        self.url, self.headers, self.body, self.size = b"", {}, [], 0
        self.header_bytes = self.header_count = self.raw_header_bytes = 0
        self.too_large = None
        self.started = time.perf_counter()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here, checked once the section is complete (one comparison per request, not two per
        # header line): what a section can hold before that is bounded by data_received's raw byte count.
        self.header_count += 1
        self.header_bytes += len(name) + len(value) + 4
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.in_headers = False
        if self.header_count > self.limits.max_headers or self.header_bytes > self.limits.max_header_bytes:
            raise _Reject(self._too_large_headers())
        self.body_limit = limit = self.listener.max_body()
        headers = self.headers
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.too_large = PayloadTooLarge(f"request body exceeds {limit} bytes")
        elif "expect" in headers and headers["expect"].lower() == "100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)
        self.in_body = True

    def on_body(self, body: bytes) -> None:
        if self.too_large is not None:
            return
        self.size += len(body)
        if self.size > self.body_limit:
            self.too_large = PayloadTooLarge(f"request body exceeds {self.body_limit} bytes")
            self.body = []
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_body = False
        self.deadline_kind = _NONE
        parsed = httptools.parse_url(self.url)
        request = HttpRequest(
            self.parser.get_method().decode("latin-1"), parsed.path.decode("latin-1"),
            parsed.query.decode("latin-1") if parsed.query else "", self.headers,
            b"".join(self.body) if len(self.body) != 1 else self.body[0], self.client, self.started,
        )
        keep_alive = self.parser.should_keep_alive() and self.too_large is None
        self.pending.append((request, keep_alive, self.too_large))
        if self.too_large is not None or len(self.pending) >= self.limits.max_pipelined_requests:
            self._pause_reading()  # answer what is queued first; a too-large body is not read at all
        if self.task is None:
            self.task = self.loop.create_task(self._serve())
        elif self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # -- answering -------------------------------------------------------------------------
    async def _serve(self) -> None:
        handler = self.listener.handler
        while True:
            if not self.pending:
                if self.closing or self.transport is None:
                    self._close()
                    return
                if not (self.in_headers or self.in_body):  # a request being received keeps its own deadline
                    self._expect(_IDLE, self.limits.keep_alive_timeout_s)
                self.wakeup = self.loop.create_future()
                await self.wakeup
                self.wakeup = None
                continue
            request, keep_alive, refused = self.pending.popleft()
            if self.read_paused and refused is None and len(self.pending) < self.limits.max_pipelined_requests:
                self._resume_reading()
            reply = error_reply(refused) if refused is not None else await handler(request)
            keep_alive = keep_alive and not self.closing and not self.listener.draining
            transport = self.transport
            if transport is None:
                return
            if reply.stream is None or request.method == "HEAD":  # inline: a coroutine per reply cost ~1 %
                head = render_head(reply, keep_alive=keep_alive)
                transport.write(head if request.method == "HEAD" else head + reply.body)
                if not self.writable.is_set():
                    await self.writable.wait()
            else:
                await self._stream(reply, keep_alive)
            if not keep_alive:
                self._close()
                return

    async def _stream(self, reply: HttpReply, keep_alive: bool) -> None:
        transport = self.transport
        assert transport is not None and reply.stream is not None
        stream = reply.stream
        try:
            transport.write(render_head(reply, keep_alive=keep_alive))
            async for chunk in stream:
                if self.transport is None:
                    return
                if chunk:
                    self.transport.write(render_chunk(chunk))
                    if not self.writable.is_set():
                        await self.writable.wait()  # the client reads slowly: so do we
            if self.transport is not None:
                self.transport.write(render_chunk(b""))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    # -- limits and closing ----------------------------------------------------------------
    def _too_large_headers(self) -> HeadersTooLarge:
        lim = self.limits
        return HeadersTooLarge(
            f"request headers exceed the limit ({lim.max_headers} fields, {lim.max_header_bytes} bytes)")

    def _expect(self, kind: int, timeout_s: float) -> None:
        self.deadline_kind, self.deadline = kind, self.loop.time() + timeout_s

    def expired(self) -> None:
        """The listener's sweep found this connection past its deadline."""
        kind, self.deadline_kind = self.deadline_kind, _NONE
        if self.transport is None or self.transport.is_closing():
            return
        if kind == _HEADERS:
            # Only a connection that never finished a header section is at fault.
            if self.in_headers or (self.task is None and not self.pending):
                self._reject(RequestTimeout("request headers were not received in time"))
        elif kind == _BODY:
            if self.in_body and not self.read_paused:
                self._close()
        elif kind == _IDLE and not self.pending and not self.in_headers and not self.in_body:
            self._close()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def _reject(self, error: GazsiError) -> None:
        """Answer a protocol-level refusal at once and close (requests queued before it are dropped)."""
        self.rejected = True
        self.in_headers = self.in_body = False
        self.deadline_kind = _NONE
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(render_head(reply := error_reply(error), keep_alive=False) + reply.body)
            self.transport.close()

    def drain(self) -> None:
        """Graceful stop: a request being received or answered finishes (``connection: close``), then the
        connection closes; an idle one closes now."""
        self.closing = True
        receiving = self.in_headers or self.in_body
        idle = self.task is None or (not self.pending and self.wakeup is not None)
        if idle and not receiving:
            self._close()

    def _close(self) -> None:
        self.deadline_kind = _NONE
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
