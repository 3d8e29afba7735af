"""Serve the control plane's app over HTTPS with optional client certificates (mTLS).

Joins come without a client certificate (the node has none yet), heartbeats with one, so
the TLS layer asks for a certificate but does not require it (``CERT_OPTIONAL``): any
certificate offered must chain to the cluster CA, and handlers read the proven node id.
uvicorn does not pass the peer certificate to the app, hence the small protocol subclass
that copies it into the per-connection ASGI ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from control_plane.api import create_app
from control_plane.service import ControlPlane

__all__ = ["ControlPlaneServer"]

log = logging.getLogger(__name__)


class _PeerCertProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        # app_state is copied into every request's scope["state"]; a per-connection copy
        # keeps one connection's certificate from leaking into another's requests.
        self.app_state = {**self.app_state, "tls_peer_cert": der}


class ControlPlaneServer:
    """Run :class:`ControlPlane` and its HTTPS app in the current event loop.

    >>> server = ControlPlaneServer(ControlPlane(settings))   # doctest: +SKIP
    >>> await server.start(); print(server.url)               # doctest: +SKIP
    """

    def __init__(self, cp: ControlPlane, *, host: str | None = None, port: int | None = None) -> None:
        self.cp = cp
        self.host = host or cp.config.host
        self.port = cp.config.port if port is None else port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[Any] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def start(self) -> None:
        await self.cp.start()
        cert, key = self.cp.ca.server_cert([self.host, *self.cp.config.server_hosts])
        config = uvicorn.Config(
            create_app(self.cp), host=self.host, port=self.port, http=_PeerCertProtocol,
            ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=str(self.cp.ca.cert_path),
            ssl_cert_reqs=ssl.CERT_OPTIONAL, log_level="warning", access_log=False, lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(), name="gazsi-cp-https")
        while not self._server.started:
            if self._task.done():
                await self._task  # surfaces bind errors
                raise RuntimeError("control plane HTTPS server exited at start")
            await asyncio.sleep(0.02)
        sock = self._server.servers[0].sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("control plane listening on %s", self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.cp.stop()
