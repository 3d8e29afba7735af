"""The routing client's default sender: per-node pools of keep-alive HTTP/1.1 connections, parsed by httptools.

Why not aiohttp (issue 14): on the 2-core machine aiohttp's client request was ~41 % of a direct
gateway's CPU (its request and response objects, payload registry, timer per request, cookie and
header machinery), and its connector (``limit=1000``, no per-host limit) opened a new connection for
every request that found none idle, so a cold gateway hit by 256 clients dialled an edge 256 times
at once. Here a request to a node:

* takes an idle connection of that node's pool (most recently used first), or
* opens a new one while the node has fewer than ``max_connections`` and fewer than ``max_connecting``
  dials in progress (a cold start grows the pool a few dials at a time instead of a storm), or
* waits, in order, for a connection to come free, until the request's deadline.

One deadline per request (``timeout_s``, from the start of :meth:`PooledSender.send`) covers the wait,
the dial (also bounded by ``connect_timeout_s``) and the answer. Deadlines are checked by one sweep per
sender (every ``timeout_s / 20``, 10-100 ms), not a timer per request; a deadline fires up to one sweep
late. Everything another node might not suffer (refused, reset, closed, timed out, no free connection in
time, an answer that does not parse) raises :class:`SendError`. A request that fails on a reused
connection before any byte of its answer came (the edge closed an idle connection just as it was
taken) is sent once more on a new connection: the requests routed here are idempotent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools
import orjson

from gazsi_cluster.routing._transport import Response, SendError, _Answer

__all__ = ["PooledSender"]

_CRLF = b"\r\n"


class _Conn(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight (no pipelining)."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.deadline = 0.0
        self.idle_since = 0.0
        self.reused = False  # has answered a request before: may have been closed by the edge while idle
        self.got_bytes = False
        self.stale = False  # lost before any byte of the answer: safe to send once more on a new connection
        self.closed = False
        self.head_only = False
        self.eof_body = False
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.waiter is None:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(SendError(f"InvalidAnswer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.eof_body:  # an answer without length or chunks ends at EOF (RFC 9112 6.3)
            self._complete(b"".join(self.body), keep=False)
            return
        self.stale = not self.got_bytes
        reason = (f"{type(exc).__name__}: {exc}" if exc is not None
                  else "ServerDisconnected: the node closed the connection")
        waiter.set_exception(SendError(reason))

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers, self.body, self.eof_body = {}, [], False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"  # a repeated field joins (RFC 9110 5.3)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.head_only:  # httptools cannot be told that a HEAD answer has no body: answer now, never reuse
            self._complete(b"", keep=False)
            return
        h = self.headers
        self.eof_body = (status >= 200 and status not in (204, 304) and "content-length" not in h
                         and "chunked" not in h.get("transfer-encoding", "").lower())

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return  # 1xx (100 Continue): the real answer follows
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self._complete(body, keep=self.parser.should_keep_alive())

    # -- requests --------------------------------------------------------------------------
    def _complete(self, body: bytes, *, keep: bool) -> None:
        waiter = self.waiter
        self.eof_body = False
        if waiter is None or waiter.done():
            return
        waiter.set_result(_Answer(self.parser.get_status_code(), self.headers, body))
        if not keep:
            self.closed = True  # not reusable; the pool closes it on release

    def _fail(self, error: SendError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.abort()

    def expired(self) -> None:
        self._fail(SendError(f"TimeoutError: no answer within {self.pool.sender.timeout_s}s"))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class _Pool:
    """One node's connections (``scheme://host:port``)."""

    def __init__(self, sender: PooledSender, origin: str) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SendError(f"InvalidURL: {origin!r} is not an http(s) URL")
        self.sender, self.origin = sender, origin
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = sender.ssl_context or ssl.create_default_context()
        self.host_header = b"host: " + parts.netloc.encode("idna") + _CRLF
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.connecting = 0
        self.waiters: collections.deque[tuple[asyncio.Future[_Conn | None], float]] = collections.deque()

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.connecting

    async def acquire(self, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    self.busy.add(conn)
                    return conn
            s = self.sender
            if self.size < s.max_connections and self.connecting < s.max_connecting:
                return await self._dial(deadline)
            fut: asyncio.Future[_Conn | None] = loop.create_future()
            self.waiters.append((fut, deadline))
            try:
                conn_or_none = await fut  # a connection handed over, or None: a dial slot came free
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    handed = fut.result()  # handed over just as the caller left: pass it on
                    if handed is not None:
                        self.release(handed)
                    else:
                        self._wake_dialer()
                raise
            if conn_or_none is not None:
                return conn_or_none

    async def _dial(self, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        self.connecting += 1
        try:
            timeout = min(self.sender.connect_timeout_s, deadline - loop.time())
            try:
                # connect_timeout_s bounds the TCP connect only (a dead node fails over fast); a TLS handshake
                # with a busy node may take longer and gets the request's own deadline (with the handshake
                # inside the 0.5 s connect timeout, as aiohttp's sock_connect has it, mTLS peer forwarding
                # failed under load on 2 cores).
                async with asyncio.timeout(max(0.0, timeout)):
                    transport, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
                if self.ssl is not None:
                    try:
                        async with asyncio.timeout(max(0.0, deadline - loop.time())):
                            tls = await loop.start_tls(transport, conn, self.ssl, server_hostname=self.host)
                    except BaseException:
                        transport.abort()
                        raise
                    if tls is None:  # the loop gave up on the connection during the handshake
                        raise ConnectionResetError("TLS handshake: the connection was closed")
                    conn.transport = tls
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                raise SendError(f"ConnectError: {type(exc).__name__}: {exc}") from exc
            self.busy.add(conn)
            return conn
        finally:
            self.connecting -= 1
            self._wake_dialer()

    def _wake_dialer(self) -> None:
        """A dial slot or room under ``max_connections`` came free: the first waiter may dial."""
        s = self.sender
        if self.size >= s.max_connections or self.connecting >= s.max_connecting:
            return
        while self.waiters:
            fut, _ = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def release(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        conn.waiter = None
        if conn.closed or self.sender.closing:
            conn.abort()
            self._wake_dialer()
            return
        conn.reused = True
        while self.waiters:
            fut, _ = self.waiters.popleft()
            if not fut.done():
                self.busy.add(conn)
                fut.set_result(conn)
                return
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)

    def drop_idle(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
        self._wake_dialer()

    def sweep(self, now: float) -> None:
        for conn in [c for c in self.busy if c.waiter is not None and now >= c.deadline]:
            conn.expired()
        if self.waiters:
            kept: collections.deque[tuple[asyncio.Future[_Conn | None], float]] = collections.deque()
            for fut, dl in self.waiters:
                if fut.done():
                    continue
                if dl <= now:
                    fut.set_exception(SendError(
                        f"PoolTimeout: no free connection to the node in time ({self.size} open)"))
                else:
                    kept.append((fut, dl))
            self.waiters = kept
        idle_s = self.sender.idle_timeout_s
        if self.idle and now - self.idle[0].idle_since >= idle_s:
            keep = [c for c in self.idle if now - c.idle_since < idle_s and not c.closed]
            for c in self.idle:
                if c not in keep:
                    c.abort()
            self.idle = keep

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            conn._fail(SendError("SenderClosed: the routing client is closing"))
        self.idle.clear()
        for fut, _ in self.waiters:
            if not fut.done():
                fut.set_exception(SendError("SenderClosed: the routing client is closing"))
        self.waiters.clear()


class PooledSender:
    """A routing :class:`~gazsi_cluster.routing._transport.Sender` for ``http://`` and ``https://`` nodes.

    ``max_connections`` per node (requests beyond it wait for a free one until their deadline),
    ``max_connecting`` dials in progress per node, idle connections closed after ``idle_timeout_s``
    (below the edges' 30 s keep-alive, so the edge rarely closes one first). ``ssl_context``: for
    https:// nodes (mTLS inside the cluster: ``tls.cluster_client_context``); None = system CAs.

    >>> sender = PooledSender(timeout_s=10, connect_timeout_s=0.5)                       # doctest: +SKIP
    >>> r = await sender.send("POST", "http://10.0.0.5:8000/v1/embeddings", content=b"{}")  # doctest: +SKIP
    """

    def __init__(
        self, *, timeout_s: float, connect_timeout_s: float, max_connections: int = 256, max_connecting: int = 16,
        idle_timeout_s: float = 15.0, ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1 or max_connecting < 1:
            raise ValueError("max_connections and max_connecting must be at least 1")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.max_connections, self.max_connecting = max_connections, max_connecting
        self.idle_timeout_s = idle_timeout_s
        self.ssl_context = ssl_context
        self.closing = False
        self._pools: dict[str, _Pool] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick = max(0.01, min(0.1, timeout_s / 20))

    def pool(self, origin: str) -> _Pool:
        """The pool of ``scheme://host:port`` (made on first use), on the running loop."""
        if asyncio.get_running_loop() is not self._loop:
            self._adopt(asyncio.get_running_loop())
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self, origin)
        return pool

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for pool in self._pools.values():
            pool.sweep(now)
        self._sweeper = None if self.closing else loop.call_later(self._tick, self._sweep)

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connections and the sweep belong to one event loop: on another (a sender kept across loops, as in
        tests) start afresh, or the old loop's sweep would never fire here and no deadline would hold."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            for conn in [*pool.idle, *pool.busy]:
                with contextlib.suppress(Exception):
                    conn.abort()
        self._pools.clear()
        self._loop = loop
        self._sweeper = loop.call_later(self._tick, self._sweep)

    async def send(self, method: str, url: str, *, content: bytes | str | None = None, json: Any = None,
                   params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> Response:
        if self.closing:
            raise SendError("SenderClosed: the routing client is closing")
        loop = asyncio.get_running_loop()
        # url = origin + target; the origin is cut at the first "/" after "scheme://".
        cut = url.find("/", url.find("://") + 3)
        origin, target = (url, "/") if cut < 0 else (url[:cut], url[cut:])
        if params:
            target += ("&" if "?" in target else "?") + urlencode(list(params.items()))
        body = b""
        head = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target.encode("latin-1"))]
        typed = False
        if headers:
            for name, value in headers.items():
                if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                    raise ValueError(f"header {name!r} holds a line break")
                typed = typed or name.lower() == "content-type"
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if json is not None:
            body = orjson.dumps(json)
            if not typed:
                head.append(b"content-type: application/json\r\n")
        elif content is not None:
            body = content.encode() if isinstance(content, str) else bytes(content)
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        pool = self.pool(origin)
        head[0] += pool.host_header
        request = b"".join(head) + body
        deadline = loop.time() + self.timeout_s
        for attempt in range(2):
            conn = await pool.acquire(deadline)
            try:
                return await self._exchange(conn, request, deadline, method == "HEAD")
            except SendError:
                if attempt or not (conn.reused and conn.stale and not self.closing):
                    raise  # a SendError either way: the routing client fails over to another node
                # The node closed this idle connection as it was taken. Its other idle ones are as old (a node
                # shutting down closes them all): drop them, so the one more try goes out on a new connection.
                # (Taking the next idle one instead let a second stale connection end the loop without an
                # answer or a SendError: the failover test lost requests under load.)
                pool.drop_idle()
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover: the second attempt returns or raises

    async def _exchange(self, conn: _Conn, request: bytes, deadline: float, head_only: bool) -> Response:
        loop = asyncio.get_running_loop()
        transport = conn.transport
        if transport is None or transport.is_closing():
            conn.closed = conn.stale = True
            raise SendError("ServerDisconnected: the node closed the connection")
        conn.got_bytes = conn.stale = False
        conn.head_only = head_only
        conn.deadline = deadline
        waiter: asyncio.Future[Response] = loop.create_future()
        conn.waiter = waiter
        transport.write(request)
        try:
            return await waiter
        except asyncio.CancelledError:
            conn.abort()  # an answer may still come on it: never reuse (hedging loser, client gone)
            raise

    async def aclose(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._loop = None
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)  # let the transports' connection_lost run
