"""Limits a public listener enforces in the HTTP protocol itself, before the app sees a request.

uvicorn bounds neither the header section (size, field count) nor the time a client may take
to send it, so a slowloris client holds a connection forever and a 1 MB header reaches the
app. :func:`protocol_class` returns a subclass of uvicorn's ``HttpToolsProtocol`` adding:

* header section over ``max_header_bytes`` or more than ``max_headers`` fields → 431, close;
* headers not complete ``header_timeout_s`` after the connection opened or the request began → 408, close;
* no body bytes for ``body_timeout_s`` while a body is expected (and the app is reading) → close;
* more than ``max_connections_per_client`` open connections from one address → 429, close.

Why a protocol subclass rather than ASGI middleware or a proxy in front: middleware runs only
after the whole header section was parsed (too late for size and time limits), and a separate
byte-level proxy would double the hops. httptools reports each header as it is parsed
(``on_header``), so counting costs a few additions per request and uvicorn keeps everything
else: keep-alive, pipelining, flow control, graceful shutdown. Rejections go through
:func:`gazsi_cluster.http.errors.to_response`, so they carry the same OpenAI-shaped body.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gazsi_cluster.config import LimitsConfig, TLSConfig
from gazsi_cluster.errors import GazsiError, HeadersTooLarge, RequestTimeout, TooManyConnections
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import render

__all__ = ["HardenedProtocol", "listener_options", "protocol_class", "raw_error"]

def raw_error(exc: GazsiError) -> bytes:
    """The full HTTP/1.1 response (``Connection: close``) for ``exc``, built by the one error mapper."""
    return render(error_reply(exc), keep_alive=False)


class _Reject(Exception):
    def __init__(self, error: GazsiError) -> None:
        super().__init__(error.message)
        self.error = error


class HardenedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus header/time/connection limits (configure via :func:`protocol_class`)."""

    limits: ClassVar[LimitsConfig] = LimitsConfig()
    # Open connections per client address, shared by every connection of one listener class.
    per_client: ClassVar[collections.Counter[str]] = collections.Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_headers = False
        self._in_body = False
        self._header_bytes = 0
        self._header_count = 0
        self._raw_header_bytes = 0
        self._counted_as: str | None = None
        self._rejected = False

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        cap = self.limits.max_connections_per_client
        if host is not None and cap:
            if self.per_client[host] >= cap:
                self._reject(TooManyConnections(
                    f"too many open connections from your address (limit {cap})", retry_after=1))
                return
            self.per_client[host] += 1
            self._counted_as = host
        # The first request's headers must arrive in time even if the client sends nothing at all.
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._counted_as is not None:
            self.per_client[self._counted_as] -= 1
            if self.per_client[self._counted_as] <= 0:
                del self.per_client[self._counted_as]
            self._counted_as = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._unset_keepalive_if_required()
        if self._in_body:
            self._arm_body_timer()
        try:
            self.parser.feed_data(data)
        except _Reject as rej:
            self._reject(rej.error)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            # httptools wraps exceptions raised in callbacks; ours are limits, not malformed HTTP.
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, _Reject):
                self._reject(cause.error)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self._in_headers:
            # httptools buffers a header until its end-of-line: bound what it may hold. The count is
            # an upper bound (the chunk that began the request may also hold the previous body's tail).
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > self.limits.max_header_bytes:
                self._reject(self._too_large())

    # -- parser callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = self._header_count = self._raw_header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        if self._header_bytes > self.limits.max_header_bytes:
            raise _Reject(self._too_large())
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers or self._header_bytes > self.limits.max_header_bytes:
            raise _Reject(self._too_large())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        self._in_body = True
        self._arm_body_timer()

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -- limits ----------------------------------------------------------------------------------
    def _too_large(self) -> HeadersTooLarge:
        lim = self.limits
        return HeadersTooLarge(
            f"request headers exceed the limit ({lim.max_headers} fields, {lim.max_header_bytes} bytes)"
        )

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        # Only a connection that never finished a header section is at fault; idle keep-alive
        # connections are the keep-alive timer's business.
        if self._in_headers or self.cycle is None:
            self._reject(RequestTimeout("request headers were not received in time"))

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def _body_timeout(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        if self.flow.read_paused:
            self._arm_body_timer()  # the app, not the client, is behind: not the client's fault
            return
        # The app is already running; closing makes its receive() report a disconnect.
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _reject(self, error: GazsiError) -> None:
        self._rejected = True
        self._in_headers = self._in_body = False
        self._cancel_timers()
        if not self.transport.is_closing():
            self.transport.write(raw_error(error))
            self.transport.close()


def protocol_class(limits: LimitsConfig) -> type[HardenedProtocol]:
    """A protocol class for one listener: its own limits and its own per-address connection count."""
    return type("GazsiHardenedProtocol", (HardenedProtocol,), {
        "limits": limits, "per_client": collections.Counter(),
    })


def listener_options(limits: LimitsConfig, tls: TLSConfig | None = None) -> dict[str, Any]:
    """uvicorn ``Config`` keyword options for a public listener: protocol limits, keep-alive, TLS.

    >>> uvicorn.run(app, host=h, port=p, **listener_options(settings.limits, settings.edge.tls))  # doctest: +SKIP
    """
    from gazsi_cluster.tls import uvicorn_ssl_options

    options: dict[str, Any] = {
        "http": protocol_class(limits),
        "timeout_keep_alive": limits.keep_alive_timeout_s,
        "server_header": False,  # do not advertise the server software and version
    }
    if tls is not None:
        options.update(uvicorn_ssl_options(tls))
    return options
