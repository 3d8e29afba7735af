"""The edge's end of a reverse tunnel: dial the gateway tier, serve HTTP/2 on that connection (issue 17).

A node behind NAT (``edge.reach: tunnel``) keeps one outbound mTLS connection to ``edge.tunnel.url``,
presenting the certificate the control plane issued at join, and answers the requests that come down
it by sending them to its *own* data listener on loopback: every feature of the node's transport
(keys, limits, cache, metrics) applies to tunnelled requests exactly as to direct ones, and no second
request path exists. A dropped tunnel is dialled again with full-jitter exponential backoff, so a
restarted gateway is not met by every node at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gazsi_cluster.config import TunnelConfig
from gazsi_cluster.tunnel import TunnelConnection

__all__ = ["TunnelDialer", "split_host_port"]

log = logging.getLogger(__name__)

# Connection-specific headers HTTP/2 forbids (RFC 9113 §8.2.2); the local listener's HTTP/1.1 may send them.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                         "content-length"})


def split_host_port(url: str) -> tuple[str, int]:
    """``host:port`` (or ``tunnel://host:port``, ``[v6]:port``) as a pair.

    >>> split_host_port("gw.example.com:8444")
    ('gw.example.com', 8444)
    """
    rest = url.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"tunnel url must be host:port, not {url!r}")
    return host.strip("[]"), int(port)


class TunnelDialer:
    """Keep a tunnel to ``config.url`` up while running; requests go to ``local_url`` (the node's listener).

    ``context`` builds the client TLS context when dialling (the node's certificate only exists after its
    join); ``ready`` says whether to dial yet.

    >>> dialer = TunnelDialer(cfg, "http://127.0.0.1:8000", context=ctx, ready=lambda: True)  # doctest: +SKIP
    >>> await dialer.start(); ...; await dialer.stop()                                         # doctest: +SKIP
    """

    def __init__(self, config: TunnelConfig, local_url: str, *, context: Callable[[], ssl.SSLContext],
                 ready: Callable[[], bool] = lambda: True) -> None:
        assert config.url is not None
        self.config, self.local_url = config, local_url.rstrip("/")
        self.host, self.port = split_host_port(config.url)
        self.context, self.ready = context, ready
        self.state = "new"
        self.connects = 0
        self.failures = 0
        self.last_error = ""
        self.connected_at: float | None = None
        self.tunnel: TunnelConnection | None = None
        self._session: Any = None
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "url": self.config.url, "connects": self.connects, "failures": self.failures,
                "last_error": self.last_error}

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gazsi-edge-tunnel")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.tunnel is not None:
            await self.tunnel.aclose("the node is stopping")
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _backoff(self) -> float:
        # Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^n)], never below a floor
        # of base/2 so a tight loop is impossible even at n = 0.
        cap = min(self.config.backoff_max_s, self.config.backoff_min_s * 2 ** min(self.failures, 16))
        return max(self.config.backoff_min_s / 2, random.uniform(0, cap))

    async def _run(self) -> None:
        while True:
            if not self.ready():
                await asyncio.sleep(0.05)
                continue
            try:
                await self._connect_once()
                self.failures = 0  # it was up: the next dial starts from the short delay again
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state = "reconnecting"
                log.warning("tunnel to %s failed (%d in a row): %s", self.config.url, self.failures, self.last_error)
            await asyncio.sleep(self._backoff())

    async def _connect_once(self) -> None:
        self.state = "connecting"
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.context(), server_hostname=self.host,
                                    ssl_handshake_timeout=self.config.connect_timeout_s),
            self.config.connect_timeout_s)
        tunnel = TunnelConnection(reader, writer, client_side=False, name=f"to {self.config.url}",
                                  handler=self._handle, max_streams=self.config.max_streams,
                                  ping_interval_s=self.config.ping_interval_s,
                                  ping_timeout_s=self.config.ping_timeout_s)
        await tunnel.start()
        self.tunnel, self.state, self.connected_at = tunnel, "connected", time.monotonic()
        self.connects += 1
        log.info("tunnel to %s up (connect #%d)", self.config.url, self.connects)
        try:
            await tunnel.closed.wait()
        finally:
            await tunnel.aclose("dialer loop ended")
            self.tunnel = None
        self.last_error = tunnel.close_reason
        self.state = "reconnecting"
        log.warning("tunnel to %s lost: %s; dialling again", self.config.url, tunnel.close_reason)

    def _session_now(self) -> Any:
        if self._session is None:
            import aiohttp

            # Loopback to this node's own listener: no verification of its certificate (it may name a
            # public host), and no pool limit beyond the tunnel's stream bound.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.max_streams, ssl=False),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0), auto_decompress=False)
        return self._session

    async def _handle(self, method: str, path: str, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[int, list[tuple[str, str]], AsyncIterator[bytes]]:
        resp = await self._session_now().request(method, self.local_url + path, data=body or None,
                                                 headers=headers)
        answer = [(k.lower(), v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()

        return resp.status, answer, chunks()
