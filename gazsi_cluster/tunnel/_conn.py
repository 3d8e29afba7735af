"""HTTP/2 over one TCP+TLS connection that the *edge* opened: both ends of a reverse tunnel (issue 17).

The roles are reversed on purpose: the edge dials out (so it works behind NAT) and then acts as the
HTTP/2 *server* on that connection; the gateway that accepted it is the HTTP/2 *client* and sends
requests down it. HTTP/2 (``h2``, sans-I/O) gives what a tunnel needs without a protocol of our own:
many streams on one connection, per-stream and per-connection flow control (WINDOW_UPDATE: a slow
reader stalls only its stream), cancellation (RST_STREAM), a stream bound (SETTINGS_MAX_CONCURRENT_STREAMS)
and liveness (PING).

Flow control is real: received DATA is acknowledged (window re-opened) only when the consumer has
taken the chunk, so a stream's buffer never holds more than its window (1 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from gazsi_cluster.errors import DeadlineExceeded, Overloaded, TunnelClosed

__all__ = ["Handler", "TunnelConnection"]

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
# What the edge side answers a request with: status, headers, body chunks (streamed as they come).
Handler = Callable[[str, str, Headers, bytes], Awaitable[tuple[int, Headers, AsyncIterator[bytes]]]]

_WINDOW = 1 << 20  # per-stream receive window: one big embeddings answer fits without a round trip
_READ = 65_536


class _Stream:
    __slots__ = ("chunks", "error", "headers", "id", "task", "window")

    def __init__(self, stream_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self.id = stream_id
        self.headers: asyncio.Future[Headers] = loop.create_future()
        # Not bounded by maxsize: bounded by the flow-control window (data is acked only when taken).
        self.chunks: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self.window = asyncio.Event()
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.headers.done():
            self.headers.set_exception(exc)
            self.headers.exception()  # retrieved: no "exception never retrieved" when nobody waits
        self.chunks.put_nowait(None)
        self.window.set()


class TunnelConnection:
    """One tunnel. ``client_side=True`` on the gateway (sends requests), False on the edge (``handler`` answers).

    >>> tunnel = TunnelConnection(reader, writer, client_side=True, name="node-1")   # doctest: +SKIP
    >>> await tunnel.start(); status, headers, body = await tunnel.request("GET", "/healthz", [], b"", 5)  # doctest: +SKIP
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client_side: bool, name: str,
        handler: Handler | None = None, max_streams: int = 100, ping_interval_s: float = 1.0,
        ping_timeout_s: float = 3.0,
    ) -> None:
        self.reader, self.writer, self.name = reader, writer, name
        self.client_side, self.handler, self.max_streams = client_side, handler, max_streams
        self.ping_interval_s, self.ping_timeout_s = ping_interval_s, ping_timeout_s
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side,
                                                                         header_encoding="utf-8"))
        self.streams: dict[int, _Stream] = {}
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.last_pong = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                                   h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW})
        # The connection window is not a SETTING: open it for max_streams windows' worth at once.
        self.conn.increment_flow_control_window(self.max_streams * _WINDOW)
        await self._flush()
        for coro in (self._read_loop(), self._ping_loop()):
            task = asyncio.create_task(coro, name=f"gazsi-tunnel-{self.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def aclose(self, reason: str = "closed") -> None:
        if not self.closed.is_set():
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                self.writer.write(self.conn.data_to_send())
        self._closed(reason)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)

    def _closed(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        log.info("tunnel %s closed: %s", self.name, reason)
        for stream in list(self.streams.values()):
            stream.fail(TunnelClosed(f"the tunnel closed: {reason}"))
            if stream.task is not None:
                stream.task.cancel()
        self.writer.close()

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    # -- I/O -------------------------------------------------------------------------------
    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _read_loop(self) -> None:
        reason = "the peer closed the connection"
        try:
            while True:
                data = await self.reader.read(_READ)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    reason = f"HTTP/2 protocol error: {exc}"
                    break
                for event in events:
                    if self._dispatch(event):
                        reason = "the peer ended the tunnel (GOAWAY)"
                        return
                await self._flush()
        except (OSError, ConnectionError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._closed(reason)

    async def _ping_loop(self) -> None:
        # Liveness both ways: a tunnel whose peer stops answering PINGs (a stalled link, a frozen process)
        # is closed within ping_timeout_s, which takes the node out of the gateway's table.
        while not self.closed.is_set():
            await asyncio.sleep(self.ping_interval_s)
            if time.monotonic() - self.last_pong > self.ping_timeout_s:
                await self.aclose(f"no PING answer for {self.ping_timeout_s:.1f}s")
                return
            with contextlib.suppress(Exception):
                self.conn.ping(b"gazsi-pi")
                await self._flush()

    def _dispatch(self, event: h2.events.Event) -> bool:
        if isinstance(event, h2.events.RequestReceived) and not self.client_side:
            stream = self.streams[event.stream_id] = _Stream(event.stream_id, self._loop)
            stream.headers.set_result(list(event.headers or []))  # type: ignore[arg-type]
            stream.task = asyncio.create_task(self._serve(stream), name=f"gazsi-tunnel-stream-{event.stream_id}")
            self._tasks.add(stream.task)
            stream.task.add_done_callback(self._tasks.discard)
        elif isinstance(event, h2.events.ResponseReceived):
            found = self.streams.get(event.stream_id)
            if found is not None and not found.headers.done():
                found.headers.set_result(list(event.headers or []))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            found = self.streams.get(event.stream_id)
            if found is not None:
                found.chunks.put_nowait((event.data or b"", event.flow_controlled_length or 0))
            else:  # a stream we gave up on: give its window back at once
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
        elif isinstance(event, h2.events.StreamEnded):
            found = self.streams.get(event.stream_id)
            if found is not None:
                found.chunks.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            found = self.streams.pop(event.stream_id, None)
            if found is not None:
                found.fail(TunnelClosed("the peer cancelled the stream", error_code=str(event.error_code)))
                if found.task is not None:  # the gateway cancelled: stop the edge's work for it
                    found.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            targets = self.streams.values() if not getattr(event, "stream_id", 0) else \
                [s for s in (self.streams.get(event.stream_id),) if s is not None]  # type: ignore[union-attr]
            for stream in targets:
                stream.window.set()
        elif isinstance(event, h2.events.PingAckReceived):
            self.last_pong = time.monotonic()
        elif isinstance(event, h2.events.PingReceived):
            self.last_pong = time.monotonic()  # the peer is alive too; h2 answers the PING itself
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True
        return False

    async def _send_body(self, stream: _Stream, data: bytes, *, end: bool) -> None:
        view = memoryview(data)
        while view:
            if stream.error is not None:
                raise stream.error
            size = min(self.conn.local_flow_control_window(stream.id), self.conn.max_outbound_frame_size, len(view))
            if size <= 0:  # the peer's window is shut: wait for its WINDOW_UPDATE (backpressure, not buffering)
                await self._flush()
                stream.window.clear()
                await stream.window.wait()
                continue
            self.conn.send_data(stream.id, bytes(view[:size]))
            view = view[size:]
        if end:
            self.conn.end_stream(stream.id)
        # One write for the whole chunk (its frames and END_STREAM), not one per frame: on the 2-core machine
        # the tunnel's cost is mostly Python per write.
        await self._flush()

    async def _body(self, stream: _Stream) -> AsyncIterator[bytes]:
        while True:
            item = await stream.chunks.get()
            if item is None:
                if stream.error is not None:
                    raise stream.error
                return
            data, flow = item
            if flow and not self.closed.is_set():
                with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    self.conn.acknowledge_received_data(flow, stream.id)
                    await self._flush()
            yield data

    # -- the gateway's side ----------------------------------------------------------------
    async def request(self, method: str, path: str, headers: Headers, body: bytes,
                      timeout_s: float) -> tuple[int, Headers, bytes]:
        """Send one request down the tunnel; raises TunnelClosed, Overloaded (streams used up) or DeadlineExceeded."""
        if self.closed.is_set():
            raise TunnelClosed(f"the tunnel is closed: {self.close_reason}")
        limit = min(self.max_streams, self.conn.remote_settings.max_concurrent_streams)
        if len(self.streams) >= limit:
            raise Overloaded("the tunnel to this node has no free stream", limit=limit)
        stream_id = self.conn.get_next_available_stream_id()
        stream = self.streams[stream_id] = _Stream(stream_id, self._loop)
        try:
            async with asyncio.timeout(timeout_s):
                self.conn.send_headers(stream_id, [(":method", method), (":path", path), (":scheme", "http"),
                                                   (":authority", "tunnel"), *headers], end_stream=not body)
                if body:  # HEADERS and the body leave in one write
                    await self._send_body(stream, body, end=True)
                else:
                    await self._flush()
                answer = await stream.headers
                chunks = [chunk async for chunk in self._body(stream)]
        except TimeoutError:
            self._reset(stream_id)
            raise DeadlineExceeded(f"no answer through the tunnel within {timeout_s:.1f}s") from None
        except (h2.exceptions.H2Error, OSError) as exc:  # the connection went away under this request
            self._reset(stream_id)
            raise TunnelClosed(f"the tunnel failed: {type(exc).__name__}: {exc}") from exc
        except asyncio.CancelledError:
            self._reset(stream_id)  # the client went away: the edge stops working on it
            raise
        finally:
            self.streams.pop(stream_id, None)
        status = next((int(v) for k, v in answer if k == ":status"), 502)
        return status, [(k, v) for k, v in answer if not k.startswith(":")], b"".join(chunks)

    def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(Exception):
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self.writer.write(self.conn.data_to_send())

    # -- the edge's side -------------------------------------------------------------------
    async def _serve(self, stream: _Stream) -> None:
        assert self.handler is not None
        try:
            head = stream.headers.result()
            pseudo = dict(h for h in head if h[0].startswith(":"))
            body = b"".join([chunk async for chunk in self._body(stream)])
            status, headers, chunks = await self.handler(pseudo.get(":method", "GET"), pseudo.get(":path", "/"),
                                                         [h for h in head if not h[0].startswith(":")], body)
            self.conn.send_headers(stream.id, [(":status", str(status)), *headers])  # leaves with the first chunk
            async for chunk in chunks:  # streamed as the node writes it (SSE passes through unchanged)
                await self._send_body(stream, chunk, end=False)
            self.conn.end_stream(stream.id)
            await self._flush()
        except asyncio.CancelledError:
            pass  # reset by the gateway or the tunnel closed: nothing to answer
        except TunnelClosed:
            pass
        except Exception as exc:
            log.warning("tunnel %s: stream %d failed: %s", self.name, stream.id, exc)
            with contextlib.suppress(Exception):
                self.conn.reset_stream(stream.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                await self._flush()
        finally:
            self.streams.pop(stream.id, None)
