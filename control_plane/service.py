"""The control plane: registry + CA + persistence + sweeper, owned in one place.

``ControlPlane`` is what the Ray actor and the HTTPS app both wrap. Its methods take and
return plain dicts (the wire shape) so the actor can expose them unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from control_plane.ca import ClusterCA
from control_plane.metrics import ControlPlaneMetrics
from control_plane.persistence import MemoryStore, PostgresStore, Store
from control_plane.registry import Registry
from control_plane.state import NodeRecord, Thresholds
from gazsi_cluster.config import Settings, read_join_token
from gazsi_cluster.errors import InvalidRequest
from gazsi_cluster.protocol import NodeFacts, NodeLoad
from gazsi_cluster.routing.table import RoutingTable

__all__ = ["ControlPlane", "node_view"]

log = logging.getLogger(__name__)

_EAGER_MAX_NODES = 1000


def node_view(rec: NodeRecord, now: float) -> dict[str, Any]:
    """What `gazsi nodes` and /admin/nodes show for one node."""
    return {
        "node_id": rec.node_id,
        "state": rec.state.value,
        "url": rec.url,
        "reach": rec.facts.reach,
        "region": rec.facts.region,
        "zone": rec.facts.zone,
        "models": rec.facts.models,
        "engine_backend": rec.facts.engine_backend,
        "gpu_model": rec.facts.gpu_model,
        "dataplane": rec.facts.dataplane,
        "dataplane_reason": rec.facts.dataplane_reason,
        "version": rec.facts.version,
        "weight": rec.weight,
        "heartbeats": rec.heartbeats,
        "last_heartbeat_age_s": round(max(0.0, now - rec.last_heartbeat), 3),
        "load": rec.load.model_dump(),
        "drain_requested": rec.drain_requested,
    }


class ControlPlane:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.monotonic,
        sweep_s: float | None = None,
    ) -> None:
        cfg = settings.control_plane
        self.settings, self.config = settings, cfg
        self.ca = ClusterCA.load_or_create(settings.data_dir)
        self.metrics = ControlPlaneMetrics()
        self.store = store or (PostgresStore(cfg.database_url) if cfg.database_url else MemoryStore())
        self.thresholds = Thresholds(cfg.heartbeat_interval_s, cfg.suspect_after_missed, cfg.dead_after_missed)
        self.registry = Registry(
            join_token=read_join_token(cfg), thresholds=self.thresholds, join_rate_per_s=cfg.join_rate_per_s,
            join_burst=cfg.join_burst, clock=clock, sinks=[self.store, self.metrics],
        )
        self._clock = clock
        # Sweep often enough that state changes lag the clock by a small fraction of an interval.
        self.sweep_s = sweep_s or min(0.1, cfg.heartbeat_interval_s / 10)
        self.table = RoutingTable.empty()
        self._table_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.start()
        restored = self.registry.restore(await self.store.load_nodes())
        if restored:
            log.info("restored %d nodes from the database", restored)
        self.tick(force=True)
        self._task = asyncio.create_task(self._run(), name="gazsi-cp-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.store.close()

    def tick(self, *, force: bool = False) -> None:
        """Sweep liveness; publish a new table on membership change or every ``table_refresh_s``."""
        reg = self.registry
        reg.sweep()
        now = self._clock()
        membership_changed = reg.snapshot_pending_membership()
        if force or membership_changed or now - self._table_at >= self.config.table_refresh_s:
            self._publish(now)
            self.metrics.set_counts(reg.counts())  # O(nodes): here, never per heartbeat
        for reason, n in reg.rejected.items():
            self.metrics.rejected.labels(reason).inc(n)
        reg.rejected.clear()

    def _publish(self, now: float) -> None:
        self.table = self.registry.snapshot()
        self._table_at = now
        self.metrics.table_version.set(self.table.version)
        self.metrics.table_nodes.set(len(self.table))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                self.tick()
            except Exception:  # never let one bad record stop liveness
                log.exception("control plane sweep failed")

    # -- node API (dicts in, dicts out) --------------------------------------------------------
    def join(self, facts: dict[str, Any] | NodeFacts, token: str | None, *, csr: str | None = None,
             proven_id: str | None = None) -> dict[str, Any]:
        f = facts if isinstance(facts, NodeFacts) else _parse(NodeFacts, facts, "facts")
        rec = self.registry.join(f, token, proven_id=proven_id)
        issued = self.ca.issue_node_cert(rec.node_id, csr, days=self.config.node_cert_days)
        if self.registry.snapshot_pending_membership():  # a re-join replaced a routable entry
            self.tick(force=True)
        return {
            "node_id": rec.node_id,
            "certificate": issued.cert_pem.decode(),
            "private_key": issued.key_pem.decode() if issued.key_pem else None,
            "ca_certificate": self.ca.cert_pem.decode(),
            "heartbeat_interval_s": self.config.heartbeat_interval_s,
            # Large tables are pulled by the agent after joining, not sent with every join.
            "table": self.table.to_dict() if len(self.table) <= _EAGER_MAX_NODES else None,
        }

    def heartbeat(self, node_id: str, load: dict[str, Any] | NodeLoad) -> dict[str, Any]:
        prev = self.registry.nodes.get(node_id)
        last = prev.last_heartbeat if prev is not None else None
        ld = load if isinstance(load, NodeLoad) else _parse(NodeLoad, load, "load", node_id=node_id)
        rec = self.registry.heartbeat(node_id, ld)
        if last is not None and rec.heartbeats > 1:
            self.metrics.heartbeat_lag.observe(max(0.0, rec.last_heartbeat - last))
        if self.registry.snapshot_pending_membership() and len(self.registry.nodes) <= _EAGER_MAX_NODES:
            # Small cluster: a node that became routable is published now, not at the next sweep.
            # Large ones wait for the sweeper, so a join storm does not rebuild the table per join.
            self._publish(self._clock())
        return {"state": rec.state.value, "table_version": self.table.version,
                "drain": rec.drain_requested}

    def table_since(self, since: int = -1) -> dict[str, Any] | None:
        return None if since == self.table.version else self.table.to_dict()

    # -- operator ------------------------------------------------------------------------------
    def list_nodes(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [node_view(r, now) for r in self.registry.nodes.values()]

    def show(self, node_id: str) -> dict[str, Any]:
        return node_view(self.registry.get(node_id), self._clock())

    def drain(self, node_id: str) -> dict[str, Any]:
        rec = self.registry.drain(node_id)
        self.tick(force=True)
        return node_view(rec, self._clock())

    def remove(self, node_id: str) -> dict[str, Any]:
        rec = self.registry.remove(node_id)
        self.tick(force=True)
        return node_view(rec, self._clock())


def _parse(model: Any, data: Any, param: str, **context: Any) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        log.warning("rejected malformed %s: %s %s", param, where, first.get("msg"))
        raise InvalidRequest(f"{param}.{where}: {first.get('msg')}", param=param, **context) from exc
