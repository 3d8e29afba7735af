"""The client-facing side of a relayed event stream: whole events, usage read, timing kept, errors as events.

Edge and gateway relay the same way: each read from the upstream is split into whole events, passed
through the :class:`~gazsi_cluster.llm.sse.UsageTap`, and forwarded as one write; a failure after the
first byte can no longer change the status, so it ends the stream with one ``data: {"error": ...}``
event. ``on_end`` runs exactly once, however the stream ends (done, error, the client gone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from gazsi_cluster.errors import UpstreamError, UpstreamTimeout
from gazsi_cluster.llm.metrics import StreamClock
from gazsi_cluster.llm.relay import Upstream
from gazsi_cluster.llm.sse import SseSplitter, UsageTap, error_event

__all__ = ["RelayStream", "relay_events"]

log = logging.getLogger(__name__)

# How a stream ended, as on_end hears it (and the metrics' reason label).
OK, UPSTREAM_ERROR, TIMEOUT, DISCONNECT = "ok", "upstream_error", "timeout", "disconnect"


class RelayStream:
    """The relay's iterator with a promise: ``on_end`` runs and the upstream closes even when nobody iterated.

    A transport may drop a stream before its first ``anext`` (the client left between the reply's head and
    its body); closing an async generator that never started runs none of its ``finally``, which would leak
    the upstream connection, the in-flight count and the key's reservation.
    """

    def __init__(self, events: AsyncIterator[bytes], up: Upstream,
                 on_end: Callable[[str], Awaitable[None]] | None) -> None:
        self._events, self._up, self._on_end = events, up, on_end
        self._started = False

    def __aiter__(self) -> RelayStream:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        return await anext(self._events)

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            await self._up.aclose()
            if self._on_end is not None:
                await asyncio.shield(self._on_end(DISCONNECT))
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


def relay_events(
    up: Upstream, tap: UsageTap, *, chunk_timeout_s: float, clock: StreamClock | None = None,
    on_end: Callable[[str], Awaitable[None]] | None = None,
) -> RelayStream:
    """The upstream's events for the client as they arrive; see the module docstring and :class:`RelayStream`."""
    return RelayStream(_events(up, tap, chunk_timeout_s, clock, on_end), up, on_end)


async def _events(
    up: Upstream, tap: UsageTap, chunk_timeout_s: float, clock: StreamClock | None,
    on_end: Callable[[str], Awaitable[None]] | None,
) -> AsyncIterator[bytes]:
    splitter = SseSplitter()
    outcome = DISCONNECT  # unless the loop below finishes or fails on its own
    try:
        try:
            async for chunk in up.chunks(chunk_timeout_s):
                out = []
                for event in splitter.feed(chunk):
                    before = tap.content_chunks
                    if tap.event(event):
                        out.append(event)
                    if clock is not None and tap.content_chunks > before:
                        clock.content(tap.content_chunks - before)
                if out:
                    yield b"".join(out)
            if not tap.done and tap.error is None:
                raise UpstreamError("the upstream ended its stream before [DONE]")
            outcome = OK
        except UpstreamError as exc:
            outcome = TIMEOUT if isinstance(exc, UpstreamTimeout) else UPSTREAM_ERROR
            log.info("stream ended early: %s", exc.message)
            yield error_event(exc)
    finally:
        await up.aclose()
        if on_end is not None:
            # The client may be gone (cancellation): the bookkeeping still runs to its end.
            await asyncio.shield(on_end(outcome))
