"""The gateway's end of reverse tunnels: accept them (mTLS), hold one per node, relay requests through them.

Identity comes from TLS only: the listener requires a client certificate chaining to the cluster CA
(OpenSSL refuses another CA's, an expired one, none), and the tunnel's node id is that certificate's
common name, the id the control plane signed at join. A node cannot claim another's id; a second
tunnel with the same id (a reconnect) replaces the first.

The routing table the control plane publishes lists a tunnelled node as ``tunnel://<node-id>``;
:meth:`TunnelHub.view` hides such a node while this gateway holds no tunnel for it, so a dropped
tunnel takes the node out of this gateway's routing at once (not after missed heartbeats), and
:class:`TunnelSender` sends ``tunnel://`` URLs down the tunnel and everything else as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from gazsi_cluster.config import GatewayConfig
from gazsi_cluster.errors import ConfigError, GazsiError
from gazsi_cluster.routing._transport import Response, Sender, SendError
from gazsi_cluster.routing.table import RoutingTable
from gazsi_cluster.tls import server_context
from gazsi_cluster.tunnel._conn import TunnelConnection

__all__ = ["TUNNEL_SCHEME", "TunnelHub", "TunnelSender", "peer_common_name", "tunnel_hub", "tunnelled_ids"]

log = logging.getLogger(__name__)

TUNNEL_SCHEME = "tunnel://"


_tunnelled: tuple[int, int, frozenset[str]] = (0, -1, frozenset())


def tunnelled_ids(table: RoutingTable) -> frozenset[str]:
    """Ids of the table's ``tunnel://`` nodes: no client can dial them (``/v1/route`` skips them). Cached for the
    last table seen, so a route decision does not scan 10,000 nodes each time."""
    global _tunnelled
    key_id, version, ids = _tunnelled
    if key_id != id(table) or version != table.version:
        ids = frozenset(n.node_id for n in table.nodes if n.url.startswith(TUNNEL_SCHEME))
        _tunnelled = (id(table), table.version, ids)
    return ids


def peer_common_name(der: bytes | None) -> str | None:
    """The common name of a DER certificate (the node id the cluster CA signed), or None."""
    if not der:
        return None
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        attrs = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) and value else None


def tunnel_hub(gateway: GatewayConfig) -> TunnelHub | None:
    """The hub ``gateway.tunnel_*`` describes, or None when tunnels are off; a bad file fails here, at start-up.

    >>> hub = tunnel_hub(settings.gateway); await hub.start(bind_socket(host, port))  # doctest: +SKIP
    """
    if gateway.tunnel_port is None:
        return None
    tls = gateway.tunnel_tls
    if tls.certfile is None or tls.keyfile is None or tls.client_ca_file is None:
        raise ConfigError("gateway.tunnel_port needs gateway.tunnel_tls.certfile, keyfile and client_ca_file "
                          "(the cluster CA: only nodes it signed may open a tunnel)")
    ctx = server_context(tls.certfile, tls.keyfile, client_ca=tls.client_ca_file, require_client_cert=True)
    ctx.set_alpn_protocols(["h2"])
    t = gateway.tunnel
    return TunnelHub(ctx, max_tunnels=t.max_tunnels, max_handshakes=t.max_handshakes, max_streams=t.max_streams,
                     handshake_timeout_s=t.connect_timeout_s, ping_interval_s=t.ping_interval_s,
                     ping_timeout_s=t.ping_timeout_s, orphan_grace_s=t.orphan_grace_s)


class _Answer:
    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status: int, headers: list[tuple[str, str]], content: bytes) -> None:
        self.status_code, self.headers, self.content = status, dict(headers), content

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.content)


class TunnelHub:
    """Accepts tunnels on ``sock`` with ``ssl_context`` (server cert + cluster CA, CERT_REQUIRED).

    Bounds: ``max_tunnels`` held at once, ``max_handshakes`` TLS handshakes in progress (a reconnect
    flood is refused at accept, before any crypto), ``max_streams`` requests in flight per tunnel.
    """

    def __init__(self, ssl_context: ssl.SSLContext, *, max_tunnels: int = 1000, max_handshakes: int = 32,
                 max_streams: int = 100, handshake_timeout_s: float = 5.0, ping_interval_s: float = 1.0,
                 ping_timeout_s: float = 3.0, orphan_grace_s: float = 15.0) -> None:
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("a tunnel listener must require client certificates (ssl.CERT_REQUIRED)")
        self.ssl_context = ssl_context
        self.max_tunnels, self.max_handshakes, self.max_streams = max_tunnels, max_handshakes, max_streams
        self.handshake_timeout_s = handshake_timeout_s
        self.ping_interval_s, self.ping_timeout_s, self.orphan_grace_s = ping_interval_s, ping_timeout_s, orphan_grace_s
        self.tunnels: dict[str, TunnelConnection] = {}
        self.generation = 0  # grows whenever the set of tunnels changes (the table view caches on it)
        self.refused: dict[str, int] = {}
        self.closed_at: dict[str, float] = {}  # node id -> when its last tunnel closed (benchmarks, tests)
        self._handshakes = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._view_key: tuple[int, int, int] | None = None
        self._view: RoutingTable | None = None
        self._orphans: dict[str, float] = {}
        self._source: Callable[[], RoutingTable] | None = None  # the control plane's table, set by view()

    async def start(self, sock: Any) -> None:
        self._server = await asyncio.start_server(self._accept, sock=sock)
        sweeper = asyncio.create_task(self._sweep(), name="gazsi-tunnel-sweeper")
        self._tasks.add(sweeper)
        sweeper.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        # On a timer, not per request: a table that stops changing must still let orphans go.
        while True:
            await asyncio.sleep(min(1.0, self.orphan_grace_s / 2))
            if self._source is not None:
                with contextlib.suppress(Exception):  # a table that cannot be read now is read next time
                    await self._prune(self._source())

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for tunnel in list(self.tunnels.values()):
            await tunnel.aclose("the gateway is stopping")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def _refuse(self, why: str, writer: asyncio.StreamWriter, peer: Any) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        log.warning("tunnel from %s refused: %s", peer, why)
        writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._handshakes >= self.max_handshakes:
            self._refuse("too many handshakes at once", writer, peer)  # before any crypto: a flood costs little
            return
        if len(self.tunnels) >= self.max_tunnels:
            self._refuse(f"tunnel limit reached ({self.max_tunnels})", writer, peer)
            return
        self._handshakes += 1
        try:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=self.handshake_timeout_s)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self._refuse(f"TLS handshake failed ({getattr(exc, 'reason', None) or exc})", writer, peer)
            return
        finally:
            self._handshakes -= 1
        ssl_object = writer.get_extra_info("ssl_object")
        node_id = peer_common_name(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
        if node_id is None:
            self._refuse("the client certificate names no node id", writer, peer)
            return
        tunnel = TunnelConnection(reader, writer, client_side=True, name=node_id, max_streams=self.max_streams,
                                  ping_interval_s=self.ping_interval_s, ping_timeout_s=self.ping_timeout_s)
        try:
            await tunnel.start()
        except (OSError, ConnectionError) as exc:  # gone between the handshake and HTTP/2's preface
            self._refuse(f"the connection failed at start ({exc})", writer, peer)
            return
        old = self.tunnels.get(node_id)
        self.tunnels[node_id] = tunnel
        self.generation += 1
        log.info("tunnel from node %s (%s) up", node_id, peer)
        if old is not None:
            await old.aclose("replaced by a new tunnel from the same node")
        task = asyncio.create_task(self._watch(node_id, tunnel), name=f"gazsi-tunnel-watch-{node_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, node_id: str, tunnel: TunnelConnection) -> None:
        await tunnel.closed.wait()
        if self.tunnels.get(node_id) is tunnel:
            del self.tunnels[node_id]
            self.generation += 1
            self.closed_at[node_id] = time.monotonic()

    async def close_node(self, node_id: str, reason: str) -> bool:
        """Close ``node_id``'s tunnel (removed or revoked node); True when there was one."""
        tunnel = self.tunnels.get(node_id)
        if tunnel is None:
            return False
        await tunnel.aclose(reason)
        return True

    # -- routing ---------------------------------------------------------------------------
    def view(self, table: Callable[[], RoutingTable]) -> Callable[[], RoutingTable]:
        """``table`` without the ``tunnel://`` nodes this gateway holds no tunnel for (cached per version);
        ``table`` is also what tunnels of unlisted nodes are swept against."""
        self._source = table

        def current() -> RoutingTable:
            t = table()
            key = (id(t), t.version, self.generation)
            if key != self._view_key:
                self._view_key, self._view = key, self._filter(t)
            assert self._view is not None
            return self._view

        return current

    def _filter(self, t: RoutingTable) -> RoutingTable:
        if not any(n.url.startswith(TUNNEL_SCHEME) for n in t.nodes):
            return t
        nodes = tuple(n for n in t.nodes if not n.url.startswith(TUNNEL_SCHEME)
                      or n.url[len(TUNNEL_SCHEME):] in self.tunnels)
        # Its own membership version: policies cache rings per membership, and this one differs from t's.
        return RoutingTable(t.version, t.membership_version * 1_000_003 + self.generation, nodes)

    async def _prune(self, t: RoutingTable) -> None:
        """Close tunnels of nodes the control plane has not listed for ``orphan_grace_s`` (removed, revoked, dead).

        A grace, not at once: a joining node is in no table until its first heartbeats, and a node that
        drains leaves the table while its last requests still come back through the tunnel.
        """
        now = time.monotonic()
        for node_id in list(self.tunnels):
            if node_id in t.by_id:
                self._orphans.pop(node_id, None)
            elif now - self._orphans.setdefault(node_id, now) > self.orphan_grace_s:
                self._orphans.pop(node_id, None)
                self.refused["not listed by the control plane"] = self.refused.get("not listed by the control plane",
                                                                                   0) + 1
                log.warning("closing the tunnel of node %s: the control plane has not listed it for %.0fs "
                            "(removed, revoked or dead)", node_id, self.orphan_grace_s)
                await self.close_node(node_id, "the control plane no longer lists this node")

    async def send(self, node_id: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                   timeout_s: float) -> Response:
        tunnel = self.tunnels.get(node_id)
        if tunnel is None or tunnel.closed.is_set():
            raise SendError(f"TunnelClosed: no tunnel to node {node_id}")
        try:
            status, answer, content = await tunnel.request(method, path, headers, body, timeout_s)
        except GazsiError as exc:  # closed, no free stream, no answer in time: another node may do better
            raise SendError(f"{type(exc).__name__}: {exc.message}") from exc
        return _Answer(status, answer, content)


class TunnelSender:
    """A routing :class:`Sender`: ``tunnel://<node-id>/path`` through ``hub``, other URLs through ``inner``."""

    def __init__(self, inner: Sender, hub: TunnelHub, *, timeout_s: float) -> None:
        self.inner, self.hub, self.timeout_s = inner, hub, timeout_s

    async def send(self, method: str, url: str, **kwargs: Any) -> Response:
        if not url.startswith(TUNNEL_SCHEME):
            return await self.inner.send(method, url, **kwargs)
        node_id, _, path = url[len(TUNNEL_SCHEME):].partition("/")
        path = "/" + path
        params: Mapping[str, str] | None = kwargs.get("params")
        if params:
            path += ("&" if "?" in path else "?") + urlencode(list(params.items()))
        raw: Mapping[str, str] = kwargs.get("headers") or {}
        headers = [(k.lower(), v) for k, v in raw.items()]
        body = kwargs.get("content") or b""
        if isinstance(body, str):
            body = body.encode()
        return await self.hub.send(node_id, method, path, headers, body, self.timeout_s)

    async def aclose(self) -> None:
        await self.inner.aclose()
