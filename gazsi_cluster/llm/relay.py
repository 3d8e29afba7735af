"""One request to an OpenAI-compatible server, held open until its first byte; then relayed chunk by chunk.

:func:`open_upstream` sends the request and returns once the first byte of the answer is in (or the
whole answer when it is not a stream of events): everything before that point may fail over to another
node, nothing after it may. :meth:`Upstream.chunks` yields the rest as it arrives, one read at a time.
Every wait has a bound: the first byte ``first_byte_timeout_s``, each later chunk ``chunk_timeout_s``.

The client is aiohttp's, not httpx's (issue 16's profile, docs/benchmarks.md "LLM streaming overhead
after profiling"): with httpx, its request setup and its per-read path through httpcore, h11 and anyio
(cancel scopes, ``current_async_library``) were ~20 % of an edge's and a gateway's CPU on this path;
aiohttp parses with llhttp in C and reads the socket from its protocol callbacks. Backpressure holds:
aiohttp's payload buffer pauses reading the socket past ``read_bufsize`` (its high-water mark), so a
slow client stops the reads here and the kernel's windows do the rest. No cookies are kept (a relay
must not carry one client's cookies to the next) and no compression is asked for (the bytes are relayed
as they come, with ``content-encoding`` dropped).

>>> up = await open_upstream(client, "http://127.0.0.1:8081/v1/chat/completions", body, {}, cfg)  # doctest: +SKIP
>>> async for chunk in up.chunks(cfg.chunk_timeout_s): ...                                        # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping

import aiohttp

from gazsi_cluster.config import LlmConfig
from gazsi_cluster.errors import UpstreamError, UpstreamTimeout

__all__ = ["Upstream", "open_upstream", "upstream_client"]

# Hop-by-hop and framing headers never pass a relay; the renderer writes its own.
_DROPPED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding",
                      "date", "server"})
# What one read may hold before aiohttp stops reading the socket (its buffer's high-water mark).
_READ_BUFSIZE = 64 * 1024


def upstream_client(cfg: LlmConfig, *, verify: ssl.SSLContext | bool = True) -> aiohttp.ClientSession:
    """The pooled client a relay sends through; call it on the loop that will use it.

    Its own timeouts are off but the connect one: the relay's are per stage. ``verify``: an
    ``ssl.SSLContext`` for https:// upstreams (mTLS inside the cluster), True for the system CAs.
    """
    connector = aiohttp.TCPConnector(limit=cfg.max_in_flight, limit_per_host=0, ssl=verify,
                                     keepalive_timeout=5.0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, skip_auto_headers=("accept-encoding",),
        read_bufsize=_READ_BUFSIZE,
    )


class Upstream:
    """An answer whose head and first bytes are in; ``aclose`` releases the connection (idempotent)."""

    def __init__(self, response: aiohttp.ClientResponse, first: bytes, *, whole: bool) -> None:
        self.response, self.first, self.whole = response, first, whole
        self.status = response.status
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
            content = self.response.content
            while True:
                try:
                    async with asyncio.timeout(chunk_timeout_s):
                        chunk = await content.readany()
                except aiohttp.ClientError as exc:
                    raise UpstreamError(f"the upstream broke off its answer ({type(exc).__name__})") from exc
                except TimeoutError:  # before OSError, its base class
                    raise UpstreamTimeout(f"the upstream sent nothing for {chunk_timeout_s:g} s") from None
                except OSError as exc:
                    raise UpstreamError(f"the upstream broke off its answer ({type(exc).__name__})") from exc
                if not chunk:  # the end of the body, as framed (a cut-off body raises above)
                    return
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Keep the connection for the next request when the answer was read to its end, else close it:
        an upstream still generating must hear at once that nobody reads (a client that left)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                if self.response.content.is_eof():
                    self.response.release()
                else:
                    self.response.close()


async def _read_all(response: aiohttp.ClientResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > limit:
            raise UpstreamError(f"the upstream's answer exceeded {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def open_upstream(
    client: aiohttp.ClientSession, url: str, content: bytes, headers: Mapping[str, str], cfg: LlmConfig,
) -> Upstream:
    """POST ``content`` to ``url``; return once the first byte is in (an event stream) or the whole body (else).

    Raises :class:`UpstreamError` (connect failure, reset) or :class:`UpstreamTimeout` (no first byte in
    ``cfg.first_byte_timeout_s``): the failures another node may not have. A non-2xx answer is returned
    whole, for the caller to relay or to retry elsewhere.
    """
    response: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(cfg.first_byte_timeout_s):
            response = await client.post(url, data=content, headers=headers, allow_redirects=False)
            ctype = response.headers.get("content-type", "")
            if response.status == 200 and ctype.startswith("text/event-stream"):
                return Upstream(response, await response.content.readany(), whole=False)
            return Upstream(response, await _read_all(response, cfg.max_response_bytes), whole=True)
    except BaseException as exc:
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()
        # aiohttp's connect timeout is a ClientError and a TimeoutError: a failure to reach, not silence.
        # TimeoutError is an OSError: it is told apart before OSError is.
        if isinstance(exc, aiohttp.ClientError) or (isinstance(exc, OSError) and not isinstance(exc, TimeoutError)):
            raise UpstreamError(f"the upstream could not be reached ({type(exc).__name__})") from exc
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(f"no answer from the upstream within {cfg.first_byte_timeout_s:g} s") from None
        raise
