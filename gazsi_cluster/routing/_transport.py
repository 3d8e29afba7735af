"""How the routing client sends HTTP: per-node connection pools by default (:mod:`._pool`), aiohttp as it was
before issue 14 (kept for comparison: ``benchmarks/gateway_direct_bench.py``), an injected httpx client in tests.

Measured on the gateway (py-spy, 2-core VM, 32 clients): httpx/httpcore took 77% of the
gateway's CPU, a third of it scanning the connection pool (`_assign_requests_to_connections`),
and capped the gateway at ~110 req/s in front of an edge doing ~360. aiohttp's connector does
not scan per request (but see :mod:`._pool` for what it did cost). Senders return objects with ``status_code``, ``headers``, ``content``
and ``json()``, and raise :class:`SendError` for anything another node might not suffer.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

__all__ = ["AiohttpSender", "HttpxSender", "Response", "SendError", "Sender"]


class SendError(Exception):
    """Connect error, reset, or timeout: worth trying another node."""


class Response(Protocol):
    status_code: int

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...

    def json(self) -> Any: ...


@dataclass(slots=True)
class _Answer:
    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return orjson.loads(self.content)


class Sender(Protocol):
    async def send(self, method: str, url: str, *, content: bytes | str | None = None, json: Any = None,
                   params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> Response: ...

    async def aclose(self) -> None: ...


class AiohttpSender:
    """``ssl_context``: for https:// nodes (mTLS inside the cluster: ``tls.cluster_client_context``);
    None = aiohttp's default verification (system CAs)."""

    def __init__(
        self, *, timeout_s: float, connect_timeout_s: float, max_connections: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout_s, self._connect_timeout_s = timeout_s, connect_timeout_s
        self._max_connections = max_connections
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: Any = None

    def _session_now(self) -> Any:
        # Created lazily: an aiohttp session belongs to the loop it was made in.
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s, sock_connect=self._connect_timeout_s),
                auto_decompress=False,
            )
        return self._session

    async def send(self, method: str, url: str, **kwargs: Any) -> Response:
        import aiohttp

        if "content" in kwargs:
            kwargs["data"] = kwargs.pop("content")
        try:
            async with self._session_now().request(method, url, **kwargs) as resp:
                body = await resp.read()
                return _Answer(resp.status, resp.headers, body)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise SendError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxSender:
    """Wraps a caller's ``httpx.AsyncClient`` (tests use ``httpx.MockTransport``)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def send(self, method: str, url: str, **kwargs: Any) -> Response:
        import httpx

        try:
            resp: Response = await self.client.request(method, url, **kwargs)
        except (httpx.TransportError, OSError) as exc:
            raise SendError(f"{type(exc).__name__}: {exc}") from exc
        return resp

    async def aclose(self) -> None:
        return None
