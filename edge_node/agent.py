"""The edge side of the control plane: join, heartbeats with load, and the routing table.

``EdgeAgent`` is what an :class:`~edge_node.node.EdgeNode` starts once its listeners are up. It speaks to the control plane through a link: :class:`HttpsLink` for
nodes outside the Ray cluster (join with the token over TLS, then mTLS with the issued
certificate) or :class:`RayLink` for a node inside it (calls the detached actor by name).
``edge_node`` never imports ``control_plane``; both share only the wire models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from gazsi_cluster.config import ControlPlaneConfig, read_join_token
from gazsi_cluster.errors import AuthenticationError, GazsiError, PermissionDenied, UnknownNode
from gazsi_cluster.protocol import NodeFacts, NodeLoad
from gazsi_cluster.routing.follower import TableFollower
from gazsi_cluster.routing.table import RoutingTable

__all__ = ["ControlPlaneLink", "EdgeAgent", "HttpsLink", "LoadWindow", "RayLink", "latency_quantiles"]

log = logging.getLogger(__name__)


class ControlPlaneLink(Protocol):
    async def join(self, facts: dict[str, Any], token: str | None) -> dict[str, Any]: ...

    async def heartbeat(self, node_id: str, load: dict[str, Any]) -> dict[str, Any]: ...

    async def table(self, since: int) -> dict[str, Any] | None: ...

    async def aclose(self) -> None: ...


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
    except Exception:
        err = {"message": resp.text[:200], "code": None}
    if err.get("code") == "unknown_node":
        raise UnknownNode(err.get("message", "unknown node"))
    message = f"control plane answered {resp.status_code}: {err.get('message')}"
    # 401/403 keep their type so the agent can tell a refused join (wrong token) from a passing failure.
    kind = {401: AuthenticationError, 403: PermissionDenied}.get(resp.status_code, GazsiError)
    raise kind(message, code=err.get("code"))


class HttpsLink:
    """HTTPS to the control plane; after join, client certificate in ``cert_dir`` (mTLS)."""

    def __init__(self, url: str, *, ca_file: Path | None, cert_dir: Path, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.ca_file, self.cert_dir, self.timeout_s = ca_file, Path(cert_dir), timeout_s
        self._http = httpx.AsyncClient(verify=self._context(with_cert=False), timeout=timeout_s)

    def _context(self, *, with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if with_cert:
            ctx.load_cert_chain(self.cert_dir / "node.crt", self.cert_dir / "node.key")
        return ctx

    async def join(self, facts: dict[str, Any], token: str | None) -> dict[str, Any]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        # The private key never leaves this node: send a CSR, keep the key on disk (0600).
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        resp = await self._http.post(f"{self.url}/v1/join", json={
            "token": token, "facts": facts, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()})
        _raise_for(resp)
        data: dict[str, Any] = resp.json()
        self.cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.cert_dir / "node.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        (self.cert_dir / "node.crt").write_text(data["certificate"])
        (self.cert_dir / "ca.crt").write_text(data["ca_certificate"])
        if self.ca_file is None:
            self.ca_file = self.cert_dir / "ca.crt"
        await self._http.aclose()
        self._http = httpx.AsyncClient(verify=self._context(with_cert=True), timeout=self.timeout_s)
        return data

    async def heartbeat(self, node_id: str, load: dict[str, Any]) -> dict[str, Any]:
        resp = await self._http.post(f"{self.url}/v1/heartbeat", json={"node_id": node_id, "load": load})
        _raise_for(resp)
        data: dict[str, Any] = resp.json()
        return data

    async def table(self, since: int) -> dict[str, Any] | None:
        resp = await self._http.get(f"{self.url}/v1/table", params={"since": since})
        if resp.status_code == 204:
            return None
        _raise_for(resp)
        data: dict[str, Any] = resp.json()
        return data

    async def aclose(self) -> None:
        await self._http.aclose()


class RayLink:
    """Calls the detached control-plane actor (``ray.get_actor(name, namespace="gazsi")``)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def join(self, facts: dict[str, Any], token: str | None) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle.join.remote(facts, token)
        return result

    async def heartbeat(self, node_id: str, load: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle.heartbeat.remote(node_id, load)
        return result

    async def table(self, since: int) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self.handle.table.remote(since)
        return result

    async def aclose(self) -> None:
        return None


class LoadWindow:
    """Turns cumulative Prometheus counters/histograms into per-heartbeat rates and quantiles."""

    def __init__(self) -> None:
        self.prev: dict[str, float] = {}
        self.at = time.monotonic()

    def delta(self, key: str, value: float) -> float:
        d = value - self.prev.get(key, 0.0)
        self.prev[key] = value
        return max(0.0, d)

    def elapsed(self) -> float:
        now = time.monotonic()
        elapsed, self.at = max(1e-3, now - self.at), now
        return elapsed


def latency_quantiles(window: LoadWindow, buckets: list[tuple[float, float]]) -> tuple[float, float]:
    """(p50, p99) in ms over this window from cumulative ``(le, count)`` histogram buckets."""
    counts = sorted((le, window.delta(f"lat{le}", c)) for le, c in buckets)
    return _quantile(counts, 0.5), _quantile(counts, 0.99)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Upper bound (ms) of the bucket holding quantile ``q`` of ``(le, count-in-window)``."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return 0.0
    for le, c in buckets:
        if c >= q * total:
            return (le if le != float("inf") else buckets[-2][0]) * 1000.0
    return 0.0


class EdgeAgent:
    """Join, then heartbeat every interval; re-join when the control plane forgot this node.

    >>> agent = EdgeAgent(HttpsLink(url, ca_file=ca, cert_dir=d), facts, node.load, cfg)  # doctest: +SKIP
    >>> await agent.start(); ...; await agent.stop()                          # doctest: +SKIP
    """

    def __init__(self, link: ControlPlaneLink, facts: NodeFacts | Callable[[], NodeFacts], load: Callable[[], NodeLoad],
                 config: ControlPlaneConfig, *, token: str | None = None, interval_s: float | None = None,
                 on_refused: Callable[[GazsiError], None] | None = None) -> None:
        # Facts are read at every join, not once: a Serve replica's user_config (batch sizes) arrives after the
        # node was built, and facts from before it made the control plane refuse true heartbeats as impossible
        # (mean batch above the default max_batch_size: the H100 and 2-core runs of 2026-12-06).
        self._facts = facts if callable(facts) else (lambda: facts)
        self.link, self.load = link, load
        self.on_refused = on_refused
        self.refusal: GazsiError | None = None
        self.token = token if token is not None else read_join_token(config)
        self.interval_s = interval_s or config.heartbeat_interval_s
        self.node_id: str | None = self._facts().node_id
        self.follower = TableFollower(self.link.table, refresh_s=config.table_refresh_s)
        self.state = "new"
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def table(self) -> RoutingTable:
        return self.follower.table

    async def join(self) -> None:
        facts = self._facts().model_copy(update={"node_id": self.node_id}).model_dump()
        data = await self.link.join(facts, self.token)
        self.node_id = data["node_id"]
        self.interval_s = float(data.get("heartbeat_interval_s", self.interval_s))
        if data.get("table") is not None:
            self.follower.push(RoutingTable.from_dict(data["table"]))
        self.state = "joined"
        log.info("joined the control plane as %s", self.node_id)

    def rejoin(self) -> None:
        """Join again at the next beat (same node id, same place): the control plane gets fresh facts."""
        if self.state == "joined":
            self.state = "new"

    async def beat(self) -> None:
        if self.node_id is None or self.state != "joined":
            await self.join()
        assert self.node_id is not None
        load = self.load()
        try:
            reply = await self.link.heartbeat(self.node_id, load.model_dump())
        except UnknownNode:
            log.info("control plane does not know %s (restarted?); joining again", self.node_id)
            self.state = "new"
            await self.join()
            reply = await self.link.heartbeat(self.node_id, load.model_dump())
        if int(reply.get("table_version", 0)) != self.table.version:
            await self.follower.refresh()

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            try:
                await self.beat()
                self.failures = 0
            except asyncio.CancelledError:
                raise
            except (AuthenticationError, PermissionDenied) as exc:
                if self.state == "joined":  # a heartbeat refused (certificate): joining again may fix it
                    self.failures += 1
                    log.warning("heartbeat failed (%d in a row): %s", self.failures, exc)
                else:
                    # A refused join (wrong token) does not get right by retrying: say so once and stop.
                    self._refused(exc)
                    return
            except Exception as exc:
                self.failures += 1
                what = "heartbeat" if self.state == "joined" else "joining the control plane"
                log.warning("%s failed (%d in a row): %s", what, self.failures, exc)
            # Fixed rate, not fixed delay: a slow heartbeat must not stretch the interval.
            next_at = max(next_at + self.interval_s, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    def _refused(self, exc: GazsiError) -> None:
        # RayLink: Ray wraps the actor's error, whose str is the remote traceback; keep the control plane's words.
        cause = getattr(exc, "cause", None)
        refusal = cause if isinstance(cause, GazsiError) else exc
        self.state, self.refusal = "refused", refusal
        log.error("the control plane refused to let this node join (%s); check the cluster's join token "
                  "(control_plane.join_token, gazsi edge serve --join-token)", refusal.message)
        if self.on_refused is not None:
            self.on_refused(refusal)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gazsi-edge-agent")

    async def stop(self, *, say_goodbye: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if say_goodbye and self.node_id is not None and self.state == "joined":
            # A last heartbeat flagged draining takes the node out of tables at once.
            load = self.load().model_copy(update={"draining": True})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.link.heartbeat(self.node_id, load.model_dump()), 2.0)
        await self.link.aclose()
