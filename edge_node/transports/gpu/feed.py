"""The host socket feed: asyncio connections that cut request heads out of TCP and hand them to a sink.

This is the packet source used where there is no DOCA GPUNetIO receive queue (every machine
here). The CPU only frames: it finds the end of a head (``\\r\\n\\r\\n``) and never parses it; the
GPU parse kernel does that, and what the kernels do not answer the data plane parses on the CPU.
The feed applies the node's listener limits (``LimitsConfig``, through :meth:`FeedLimits.from_config`)
as :class:`gazsi_cluster.http.listener.HttpListener` does on the other transports, with the same
refusals (one error mapping, one renderer):

* more than ``max_connections_per_client`` open connections from one address -> 429, close;
* a head not complete ``header_timeout_s`` after the connection opened or the head's first byte
  arrived (slowloris) -> 408, close;
* no terminator within ``max_head`` bytes (the configured ``max_header_bytes`` plus the request line's
  method and version, which the listener does not count) -> 431, close (what follows cannot be framed);
* an idle keep-alive connection closes after ``keepalive_timeout_s``;
* a request body the data plane reads (:meth:`FeedConnection.read_body`) that goes silent for
  ``body_timeout_s`` -> close.

Pipelining is bounded by construction: one request per connection is in service at a time (the next
head is cut only after the previous response was written, so answers go out in order), no next head is
cut while the client leaves its answers unread (the transport's write buffer is full), and more than
``max_buffer`` bytes waiting pauses reading, so TCP pushes back on a client pipelining far ahead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from gazsi_cluster.errors import GazsiError, HeadersTooLarge, RequestTimeout, TooManyConnections
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import render

from . import _layout as L

if TYPE_CHECKING:
    from gazsi_cluster.config import LimitsConfig

__all__ = ["FeedConnection", "FeedLimits", "HeadFramer", "HeadSink", "Work"]

_TERM = b"\r\n\r\n"
# A CR or LF that is not part of a CRLF: no terminator will make this head valid.
_BARE = re.compile(rb"\r(?=[^\n])|(?<!\r)\n")
# The listener counts the target and the header fields (name + value + 4 each), not the method and the
# version around the target: a head may run this much past max_header_bytes and still be within it.
_REQUEST_LINE_SLACK = 64


class HeadFramer:
    """Bytes in, complete request heads out; pure logic (unit-tested without sockets).

    >>> f = HeadFramer()
    >>> f.feed(b"GET / HTTP/1.1\\r\\n\\r\\nGET /x")
    >>> f.next_head()
    (b'GET / HTTP/1.1\\r\\n\\r\\n', False)
    >>> f.next_head() is None
    True
    """

    def __init__(self, max_head: int = L.REQ_STRIDE) -> None:
        self.max_head = max_head
        self._buf = bytearray()
        self._skip = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if self._skip:
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
        self._buf += data

    def skip(self, n: int) -> None:
        """Drop the next ``n`` bytes of the stream (a request body), buffered or still to come."""
        cut = min(n, len(self._buf))
        del self._buf[:cut]
        self._skip += n - cut

    def take(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes (a request body being read), removed from the buffer."""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def next_head(self) -> tuple[bytes, bool] | None:
        """``(head, oversized)`` or None while incomplete. An oversized head has no terminator.

        A bare CR or LF before any terminator hands on what came up to it (no parser accepts it: 400
        at once, as the CPU listeners answer, instead of a wait for a terminator that may never come).
        """
        if not self._buf:  # after every answer to a client that does not pipeline: nothing to look through
            return None
        end = self._buf.find(_TERM, 0, self.max_head)
        if end >= 0:
            head = bytes(self._buf[: end + 4])
            del self._buf[: end + 4]
            return head, False
        bare = _BARE.search(self._buf, 0, self.max_head)
        if bare is not None:
            head = bytes(self._buf[: bare.end()])
            del self._buf[: bare.end()]
            return head, False
        if len(self._buf) >= self.max_head:
            head = bytes(self._buf[: self.max_head])
            self._buf.clear()
            return head, True
        return None


@dataclass(frozen=True, slots=True)
class FeedLimits:
    """The listener limits as the feed applies them; :meth:`from_config` maps the node's ``LimitsConfig``."""

    max_head: int = L.REQ_STRIDE
    max_buffer: int = 2 * L.REQ_STRIDE
    max_header_bytes: int = L.REQ_STRIDE
    max_headers: int = L.MAX_HEADERS
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    max_connections_per_client: int = 0

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> FeedLimits:
        """The feed's limits for ``limits`` (``settings.limits``), the ones every other listener applies."""
        max_head = limits.max_header_bytes + _REQUEST_LINE_SLACK
        return cls(max_head=max_head, max_buffer=2 * max_head, max_header_bytes=limits.max_header_bytes,
                   max_headers=limits.max_headers, header_timeout_s=limits.header_timeout_s,
                   keepalive_timeout_s=limits.keep_alive_timeout_s, body_timeout_s=limits.body_timeout_s,
                   max_connections_per_client=limits.max_connections_per_client)

    def headers_too_large(self) -> HeadersTooLarge:
        """The 431 every listener sends (the same message as :class:`~gazsi_cluster.http.listener.HttpListener`)."""
        return HeadersTooLarge(f"request headers exceed the limit ({self.max_headers} fields, "
                               f"{self.max_header_bytes} bytes)")


class Work(Protocol):
    """What a connection's request in service runs as: an asyncio task, or a share of a burst's task."""

    def done(self) -> bool: ...

    def cancel(self) -> bool: ...


class HeadSink(Protocol):
    def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None: ...


class FeedConnection(asyncio.Protocol):
    """One client connection of the host socket feed. ``per_client`` is the listener's open-connection count."""

    def __init__(self, sink: HeadSink, limits: FeedLimits | None = None,
                 per_client: collections.Counter[str] | None = None) -> None:
        self.sink = sink
        self.limits = limits or FeedLimits()
        self.per_client = per_client
        self.framer = HeadFramer(self.limits.max_head)
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None
        self.busy = False  # a request of this connection is being served
        self.closed = False
        self.draining = False  # the data plane is stopping: close once the request in service is answered
        self.task: Work | None = None  # its CPU work, cancelled if the client leaves
        self.writable = asyncio.Event()
        self.writable.set()
        self._counted = False
        self._paused = False
        # One lazy timer for the connection's clocks (header, body, keep-alive): arming moves a deadline, and
        # the timer, when it fires early, waits out the rest. A cancel and a new TimerHandle per request was
        # two heap operations a response (the keep-alive clock restarts with every answer).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the pending timer fires (loop time)
        self._timer_kind = ""  # the clock running, "" when none
        self._deadline = 0.0
        self._body = bytearray()
        self._body_keep = True
        self._body_got = 0
        self._body_need = 0
        self._body_fut: asyncio.Future[bytes] | None = None

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) and peer else None
        cap = self.limits.max_connections_per_client
        if self.client is not None and cap and self.per_client is not None:
            if self.per_client[self.client] >= cap:
                self.reject(TooManyConnections(f"too many open connections from your address (limit {cap})",
                                               retry_after=1))
                return
            self.per_client[self.client] += 1
            self._counted = True
        # The first head must arrive in time even if the client sends nothing at all.
        self._arm(self.limits.header_timeout_s, "header")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.framer.feed(data)
        if self._body_fut is not None:
            self._pump_body()
        if self.framer.buffered > self.limits.max_buffer and not self._paused and self.transport is not None:
            self.transport.pause_reading()  # the client is far ahead of us: TCP pushes back
            self._paused = True
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm(cancel=True)
        self.writable.set()
        if self._counted and self.client is not None and self.per_client is not None:
            self._counted = False
            self.per_client[self.client] -= 1
            if self.per_client[self.client] <= 0:
                del self.per_client[self.client]
        if self._body_fut is not None and not self._body_fut.done():
            self._body_fut.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # a disconnect cancels the work (the batcher drops it)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()
        self._next()  # the client read its answers: serve the next head it pipelined

    # -- called by the data plane ---------------------------------------------------------
    def skip_body(self, n: int) -> None:
        if n > 0:
            self.framer.skip(n)

    def read_body(self, n: int, *, keep: bool = True) -> asyncio.Future[bytes]:
        """The next ``n`` bytes of the stream (the body of the request in service), buffered or to come.

        ``keep=False`` reads them without holding them (a body refused as too large): the result is ``b""``.
        """
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._body, self._body_keep, self._body_got, self._body_need = bytearray(), keep, 0, n
        self._body_fut = fut
        self._pump_body()
        return fut

    def write(self, data: bytes) -> None:
        """Part of a response (``100 Continue``, a chunk of a streamed body)."""
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def respond(self, data: bytes, keep_alive: bool) -> None:
        """Write a complete response (or its last part); then either close or go on with the next head."""
        self.task = None
        if self.closed or self.transport is None:
            return
        self.transport.write(data)
        self.busy = False
        if not keep_alive or self.draining:
            self.close()
            return
        if self._paused and self.framer.buffered <= self.limits.max_buffer:
            self.transport.resume_reading()
            self._paused = False
        self._arm(self.limits.keepalive_timeout_s)
        self._next()

    def close(self) -> None:
        """Close now (what was written still goes out)."""
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True
        self._disarm(cancel=True)

    def drain(self) -> None:
        """Graceful stop: an idle connection closes now, one being served after its answer."""
        self.draining = True
        if not self.busy:
            self.close()

    def reject(self, error: GazsiError) -> None:
        """Answer a protocol-level refusal at once and close (as the other listeners do)."""
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(render(error_reply(error), keep_alive=False))
            self.transport.close()
        self.closed = True
        self._disarm(cancel=True)

    # -- internals ------------------------------------------------------------------------
    def _next(self) -> None:
        if self.busy or self.closed:
            return
        if not self.writable.is_set():
            # The client does not read its answers: no next head until it does (resume_writing), so the
            # answers waiting for it stay bounded; it is the server that waits, so no client clock runs.
            self._disarm()
            return
        item = self.framer.next_head()
        if item is None:
            if self.framer.buffered:
                if self._timer_kind != "header":
                    # A head has started: the slow-client clock runs from its first byte, not its last.
                    self._arm(self.limits.header_timeout_s, "header")
            elif not self._timer_kind:
                self._arm(self.limits.keepalive_timeout_s)  # idle (after writing resumed)
            return
        head, oversized = item
        if oversized:
            self.reject(self.limits.headers_too_large())
            return
        self.busy = True
        self._disarm()
        self.sink.submit(self, head, time.perf_counter_ns())

    def _pump_body(self) -> None:
        fut = self._body_fut
        assert fut is not None
        chunk = self.framer.take(self._body_need - self._body_got)
        self._body_got += len(chunk)
        if self._body_keep:
            self._body += chunk
        if self._body_got >= self._body_need:
            body, self._body, self._body_fut = bytes(self._body), bytearray(), None
            self._disarm()
            if not fut.done():
                fut.set_result(body)
        else:
            self._arm(self.limits.body_timeout_s, "body")  # re-armed by every chunk: a bound on silence
            if self._paused and self.transport is not None:
                # Reading paused on a full buffer before the body was asked for: the body drains it.
                self.transport.resume_reading()
                self._paused = False

    def _arm(self, seconds: float, kind: str = "idle") -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        self._timer_kind = kind
        if self._timer is not None and self._timer_at <= self._deadline:
            return  # the pending timer fires first and waits out the rest
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._deadline
        self._timer = loop.call_at(self._deadline, self._fire)

    def _disarm(self, *, cancel: bool = False) -> None:
        """Stop the clock; the timer stays pending (it finds nothing to do) unless the connection is done."""
        self._timer_kind = ""
        if cancel and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if not kind:
            return
        loop = asyncio.get_running_loop()
        if self._deadline > loop.time():  # armed again since this timer was set
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._fire)
            return
        self._timeout(kind)

    def _timeout(self, kind: str) -> None:
        self._timer_kind = ""
        if self.transport is None or self.closed:
            return
        if kind == "body":
            self.close()
        elif not self.busy:
            if kind == "header":
                self.reject(RequestTimeout("request headers were not received in time"))
            else:
                self.close()
