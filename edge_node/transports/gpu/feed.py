"""The host socket feed: asyncio connections that cut request heads out of TCP and hand them to a sink.

This is the packet source used where there is no DOCA GPUNetIO receive queue (every machine
here). The CPU only frames: it finds the end of a head (``\\r\\n\\r\\n``) and never parses it; the
GPU parse kernel does that. Rules, kept consistent with the kernel's statuses:

* One request per connection at a time: the next head is cut only after the previous response
  was written, so pipelined requests are answered in order and buffers stay bounded.
* A head is at most ``REQ_STRIDE`` bytes. With no terminator by then the bytes go to the kernel
  anyway, which answers 431, and the connection closes (it cannot be resynchronised).
* A request body (``Content-Length`` that the kernel reported) is skipped, never buffered.
* More than ``max_buffer`` bytes waiting (a client pipelining far ahead) pauses reading.
* A partial head older than ``header_timeout_s`` (slow client) or an idle keep-alive connection
  older than ``keepalive_timeout_s`` is closed, as uvicorn does on the socket path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Protocol, cast

from . import _layout as L

__all__ = ["FeedConnection", "FeedLimits", "HeadFramer", "HeadSink"]

_TERM = b"\r\n\r\n"


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

    def next_head(self) -> tuple[bytes, bool] | None:
        """``(head, oversized)`` or None while incomplete. An oversized head has no terminator."""
        end = self._buf.find(_TERM, 0, self.max_head)
        if end >= 0:
            head = bytes(self._buf[: end + 4])
            del self._buf[: end + 4]
            return head, False
        if len(self._buf) >= self.max_head:
            head = bytes(self._buf[: self.max_head])
            self._buf.clear()
            return head, True
        return None


@dataclass(frozen=True, slots=True)
class FeedLimits:
    max_buffer: int = 2 * L.REQ_STRIDE
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 30.0


class HeadSink(Protocol):
    def submit(self, conn: FeedConnection, head: bytes, t0_ns: int) -> None: ...


class FeedConnection(asyncio.Protocol):
    """One client connection of the host socket feed."""

    def __init__(self, sink: HeadSink, limits: FeedLimits | None = None) -> None:
        self.sink = sink
        self.limits = limits or FeedLimits()
        self.framer = HeadFramer()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request of this connection is being served
        self.closed = False
        self.task: asyncio.Task[None] | None = None  # its CPU work, cancelled if the client leaves
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._close_after_write = False

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm(self.limits.keepalive_timeout_s)

    def data_received(self, data: bytes) -> None:
        self.framer.feed(data)
        if self.framer.buffered > self.limits.max_buffer and not self._paused and self.transport is not None:
            self.transport.pause_reading()  # the client is far ahead of us: TCP pushes back
            self._paused = True
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # a disconnect cancels the work (the batcher drops it)

    # -- called by the data plane ---------------------------------------------------------
    def skip_body(self, n: int) -> None:
        if n > 0:
            self.framer.skip(n)

    def respond(self, data: bytes, keep_alive: bool) -> None:
        """Write a complete response; then either close or go on with the next head."""
        self.task = None
        if self.closed or self.transport is None:
            return
        self.transport.write(data)
        self.busy = False
        if not keep_alive or self._close_after_write:
            self.transport.close()
            self.closed = True
            return
        if self._paused and self.framer.buffered <= self.limits.max_buffer:
            self.transport.resume_reading()
            self._paused = False
        self._arm(self.limits.keepalive_timeout_s)
        self._next()

    # -- internals ------------------------------------------------------------------------
    def _next(self) -> None:
        if self.busy or self.closed:
            return
        item = self.framer.next_head()
        if item is None:
            if self.framer.buffered and self._timer_kind != "header":
                # A head has started: the slow-client clock runs from its first byte, not its last.
                self._arm(self.limits.header_timeout_s, "header")
            return
        head, oversized = item
        self._close_after_write = oversized  # 431 follows; what comes after cannot be framed
        self.busy = True
        self._disarm()
        self.sink.submit(self, head, time.perf_counter_ns())

    def _arm(self, seconds: float, kind: str = "idle") -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timeout)
        self._timer_kind = kind

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = ""

    def _timeout(self) -> None:
        if not self.busy and self.transport is not None:
            self.transport.close()
