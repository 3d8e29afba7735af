"""One request to an OpenAI-compatible server, held open until its first byte; then relayed chunk by chunk.

:func:`open_upstream` sends the request and returns once the first byte of the answer is in (or the
whole answer when it is not a stream of events): everything before that point may fail over to another
node, nothing after it may. :meth:`Upstream.chunks` yields the rest as it arrives, pulled one read at a
time, so a slow client slows the read from the upstream instead of growing a buffer (httpx reads the
socket only when asked; the kernel's windows do the rest). Every wait has a bound: the first byte
``first_byte_timeout_s``, each later chunk ``chunk_timeout_s``.

>>> up = await open_upstream(client, "http://127.0.0.1:8081/v1/chat/completions", body, {}, cfg)  # doctest: +SKIP
>>> async for chunk in up.chunks(cfg.chunk_timeout_s): ...                                        # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from gazsi_cluster.config import LlmConfig
from gazsi_cluster.errors import UpstreamError, UpstreamTimeout

__all__ = ["Upstream", "open_upstream", "upstream_client"]

# Hop-by-hop and framing headers never pass a relay; the renderer writes its own.
_DROPPED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding",
                      "date", "server"})


def upstream_client(cfg: LlmConfig, *, verify: Any = True) -> httpx.AsyncClient:
    """The pooled client a relay sends through; its own timeouts are off, the relay's are per stage."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=cfg.connect_timeout_s),
        limits=httpx.Limits(max_connections=cfg.max_in_flight, max_keepalive_connections=min(64, cfg.max_in_flight)),
        verify=verify, trust_env=False,
    )


class Upstream:
    """An answer whose head and first bytes are in; ``aclose`` releases the connection (idempotent)."""

    def __init__(self, response: httpx.Response, first: bytes, rest: AsyncIterator[bytes], *, whole: bool) -> None:
        self.response, self.first, self._rest, self.whole = response, first, rest, whole
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "application/json")
        self._closed = False

    @property
    def is_event_stream(self) -> bool:
        return bool(self.content_type.split(";")[0].strip().lower() == "text/event-stream")

    def headers(self, keep: frozenset[str] | None = None) -> list[tuple[str, str]]:
        """The upstream's headers worth relaying (``keep``: only these, lower-case)."""
        out = []
        for name, value in self.response.headers.items():
            low = name.lower()
            if low in _DROPPED or low == "content-type" or (keep is not None and low not in keep):
                continue
            out.append((low, value))
        return out

    async def chunks(self, chunk_timeout_s: float) -> AsyncIterator[bytes]:
        """The first bytes, then each later read; silence past ``chunk_timeout_s`` raises :class:`UpstreamTimeout`."""
        try:
            if self.first:
                yield self.first
            if self.whole:
                return
            while True:
                try:
                    async with asyncio.timeout(chunk_timeout_s):
                        chunk = await anext(self._rest, None)
                except TimeoutError:
                    raise UpstreamTimeout(f"the upstream sent nothing for {chunk_timeout_s:g} s") from None
                except httpx.HTTPError as exc:
                    raise UpstreamError(f"the upstream broke off its answer ({type(exc).__name__})") from exc
                if chunk is None:
                    return
                if chunk:
                    yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self.response.aclose()


async def _read_all(it: AsyncIterator[bytes], limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in it:
        size += len(chunk)
        if size > limit:
            raise UpstreamError(f"the upstream's answer exceeded {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def open_upstream(
    client: httpx.AsyncClient, url: str, content: bytes, headers: Mapping[str, str], cfg: LlmConfig,
) -> Upstream:
    """POST ``content`` to ``url``; return once the first byte is in (an event stream) or the whole body (else).

    Raises :class:`UpstreamError` (connect failure, reset) or :class:`UpstreamTimeout` (no first byte in
    ``cfg.first_byte_timeout_s``): the failures another node may not have. A non-2xx answer is returned
    whole, for the caller to relay or to retry elsewhere.
    """
    request = client.build_request("POST", url, content=content, headers=headers)
    response: httpx.Response | None = None
    try:
        async with asyncio.timeout(cfg.first_byte_timeout_s):
            response = await client.send(request, stream=True)
            rest = response.aiter_raw()
            ctype = response.headers.get("content-type", "")
            if response.status_code == 200 and ctype.startswith("text/event-stream"):
                first = b""
                while not first:
                    chunk = await anext(rest, None)
                    if chunk is None:
                        break
                    first = chunk
                return Upstream(response, first, rest, whole=False)
            body = await _read_all(rest, cfg.max_response_bytes)
            return Upstream(response, body, rest, whole=True)
    except BaseException as exc:
        if response is not None:
            with contextlib.suppress(Exception):
                await response.aclose()
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(f"no answer from the upstream within {cfg.first_byte_timeout_s:g} s") from None
        if isinstance(exc, httpx.HTTPError):
            raise UpstreamError(f"the upstream could not be reached ({type(exc).__name__})") from exc
        raise
