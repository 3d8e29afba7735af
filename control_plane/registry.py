"""The node registry: joins, heartbeats, liveness sweeps and routing-table snapshots.

Plain Python with an injected clock, so the state machine is tested without Ray or sleeps.
Hot-path costs are kept O(1) per heartbeat: nodes sit in an ordered dict by last heartbeat
(move-to-end on each beat), so a sweep looks only at the stale front, and a snapshot rebuilds
only the entries of nodes that reported since the last one.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from control_plane._ratelimit import TokenBucket
from control_plane.state import NodeRecord, NodeState, Thresholds
from gazsi_cluster.errors import AuthenticationError, Conflict, InvalidRequest, RateLimited, UnknownNode
from gazsi_cluster.protocol import NodeFacts, NodeLoad
from gazsi_cluster.routing.table import NodeEntry, RoutingTable

__all__ = ["NodeEvent", "Registry", "RegistrySink"]

log = logging.getLogger(__name__)

_MAX_COUNT = 10_000_000  # queue depth / in-flight beyond this is not a real node


@dataclass(frozen=True, slots=True)
class NodeEvent:
    node_id: str
    kind: str  # joined, rejoined, state, drain, removed, restored
    state: str
    detail: str = ""


class RegistrySink(Protocol):
    """Receives events and heartbeat samples; must not block (persistence batches them)."""

    def event(self, event: NodeEvent, record: NodeRecord) -> None: ...

    def sample(self, node_id: str, load: NodeLoad) -> None: ...


def _weight(facts: NodeFacts) -> int:
    # Capacity is roughly proportional to the batch a node runs; clamp so no node hogs WRR.
    return max(1, min(64, facts.max_batch_size // 8))


class Registry:
    def __init__(
        self,
        *,
        join_token: str | None,
        thresholds: Thresholds | None = None,
        join_rate_per_s: float = 20.0,
        join_burst: int = 50,
        clock: Callable[[], float] = time.monotonic,
        sinks: Iterable[RegistrySink] = (),
    ) -> None:
        self._token = join_token.encode() if join_token else None
        self.thresholds = thresholds or Thresholds()
        self._clock = clock
        self._joins = TokenBucket(join_rate_per_s, join_burst, clock=clock)
        self.sinks: list[RegistrySink] = list(sinks)
        self.nodes: OrderedDict[str, NodeRecord] = OrderedDict()
        self._entries: dict[str, NodeEntry] = {}
        self._changed: set[str] = set()
        self._membership = 0
        self._version = 0
        self._table = RoutingTable.empty()
        self.rejected: dict[str, int] = {}

    # -- helpers -------------------------------------------------------------------------------
    def _emit(self, rec: NodeRecord, kind: str, detail: str = "") -> None:
        ev = NodeEvent(rec.node_id, kind, rec.state.value, detail)
        for sink in self.sinks:
            sink.event(ev, rec)

    def _reject(self, reason: str, exc: Exception) -> Exception:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        log.warning("rejected: %s (%s)", reason, exc)
        return exc

    def _routable_changed(self, rec: NodeRecord) -> None:
        if rec.routable:
            if rec.node_id not in self._entries:
                self._membership += 1
            self._changed.add(rec.node_id)
        elif self._entries.pop(rec.node_id, None) is not None:
            self._membership += 1

    def _transition(self, rec: NodeRecord, prev: NodeState | None) -> None:
        if prev is None:
            return
        self._routable_changed(rec)
        self._emit(rec, "state", f"{prev.value}->{rec.state.value}")

    def check_token(self, token: str | None) -> None:
        if self._token is None:
            return  # no token configured: open cluster (embedded / tests)
        if not token:  # said apart from a wrong one: the operator forgot --join-token, nothing was guessed
            raise self._reject("no_token", AuthenticationError("no join token given: this cluster needs one"))
        if not secrets.compare_digest(token.encode(), self._token):
            raise self._reject("bad_token", AuthenticationError("invalid join token"))

    # -- joins ---------------------------------------------------------------------------------
    def join(self, facts: NodeFacts, token: str | None, *, proven_id: str | None = None) -> NodeRecord:
        """Admit a node; ``proven_id`` is the node id its client certificate proves (mTLS).

        A node id held by a live node is refused (409) unless the caller proves it owns the id
        or it comes back from the same address and port (a restart): then the old entry is
        replaced. Dead and removed entries are always replaced.
        """
        wait = self._joins.try_take()
        if wait:
            raise self._reject("join_rate", RateLimited("too many registrations", retry_after=wait))
        self.check_token(token)
        now = self._clock()
        node_id = facts.node_id or f"n-{secrets.token_hex(6)}"
        old = self.nodes.get(node_id)
        kind = "joined"
        if old is not None:
            live = old.state not in (NodeState.DEAD, NodeState.REMOVED)
            same_place = (old.facts.address, old.facts.port) == (facts.address, facts.port)
            if live and proven_id != node_id and not same_place:
                raise self._reject("duplicate", Conflict(f"node id {node_id!r} is held by a live node",
                                                         param="node_id"))
            del self.nodes[node_id]
            if self._entries.pop(node_id, None) is not None:
                self._membership += 1
            kind = "rejoined"
        rec = NodeRecord(node_id, facts.model_copy(update={"node_id": node_id}), now, now,
                         state_since=now, weight=_weight(facts))
        self.nodes[node_id] = rec
        self._emit(rec, kind, f"{facts.address}:{facts.port}")
        return rec

    def restore(self, records: Iterable[NodeRecord]) -> int:
        """Re-admit nodes known before a restart as healthy with a fresh grace period.

        They stay routable for one suspect interval; if they do not heartbeat they go the usual
        way (suspect, dead), so a control-plane restart does not empty the routing tables.
        """
        now, count = self._clock(), 0
        for rec in records:
            if rec.node_id in self.nodes or rec.state in (NodeState.DEAD, NodeState.REMOVED):
                continue
            rec.last_heartbeat, rec.state_since = now, now
            rec.state = NodeState.DRAINING if rec.state is NodeState.DRAINING else NodeState.HEALTHY
            self.nodes[rec.node_id] = rec
            self._routable_changed(rec)
            self._emit(rec, "restored")
            count += 1
        return count

    # -- heartbeats ----------------------------------------------------------------------------
    def _validate(self, rec: NodeRecord, load: NodeLoad) -> None:
        problems = []
        if load.queue_depth > _MAX_COUNT or load.in_flight > _MAX_COUNT:
            problems.append("queue_depth/in_flight out of range")
        if load.p99_ms and load.p50_ms > load.p99_ms:
            problems.append("p50_ms > p99_ms")
        if load.mean_batch_size > rec.facts.max_batch_size:
            problems.append("mean_batch_size > max_batch_size")
        if rec.facts.gpu_memory_mb is not None and load.gpu_memory_used_mb is not None \
                and load.gpu_memory_used_mb > rec.facts.gpu_memory_mb:
            problems.append("gpu_memory_used_mb > gpu_memory_mb")
        if problems:
            raise self._reject("impossible_load", InvalidRequest(
                f"impossible heartbeat values: {', '.join(problems)}", param="load", node_id=rec.node_id))

    def heartbeat(self, node_id: str, load: NodeLoad) -> NodeRecord:
        rec = self.nodes.get(node_id)
        if rec is None or rec.state is NodeState.REMOVED:
            raise self._reject("unknown_node", UnknownNode(f"unknown node {node_id!r}; join again",
                                                            param="node_id"))
        self._validate(rec, load)
        now = self._clock()
        if rec.state is NodeState.DEAD:
            # A node declared dead that speaks again was partitioned, not gone: take it back.
            rec.set_state(NodeState.SUSPECT, now)
        prev = rec.on_heartbeat(load, now)
        self.nodes.move_to_end(node_id)
        if prev is not None:
            self._transition(rec, prev)
        elif rec.routable:
            self._changed.add(node_id)
        for sink in self.sinks:
            sink.sample(node_id, load)
        return rec

    # -- operator ------------------------------------------------------------------------------
    def get(self, node_id: str) -> NodeRecord:
        rec = self.nodes.get(node_id)
        if rec is None:
            raise UnknownNode(f"unknown node {node_id!r}", param="node_id")
        return rec

    def drain(self, node_id: str) -> NodeRecord:
        rec = self.get(node_id)
        rec.drain_requested = True
        if rec.state in (NodeState.HEALTHY, NodeState.SUSPECT, NodeState.JOINING):
            self._transition(rec, rec.set_state(NodeState.DRAINING, self._clock()))
        self._emit(rec, "drain")
        return rec

    def remove(self, node_id: str) -> NodeRecord:
        rec = self.get(node_id)
        self._transition(rec, rec.set_state(NodeState.REMOVED, self._clock()))
        del self.nodes[node_id]
        self._emit(rec, "removed")
        return rec

    # -- clock ---------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Apply the clock: suspect, dead, removed. Returns the number of state changes."""
        now = self._clock()
        fresh_after = now - min(self.thresholds.suspect_s, self.thresholds.join_timeout_s)
        changes = 0
        gone: list[str] = []
        for rec in self.nodes.values():  # oldest heartbeat first
            if rec.last_heartbeat > fresh_after and rec.state is not NodeState.DEAD:
                break
            prev = rec.evaluate(now, self.thresholds)
            if prev is not None:
                changes += 1
                self._transition(rec, prev)
                if rec.state is NodeState.REMOVED:
                    gone.append(rec.node_id)
        for node_id in gone:
            del self.nodes[node_id]
        return changes

    def snapshot_pending_membership(self) -> bool:
        """True when the set of routable nodes changed since the last snapshot."""
        return self._table.membership_version != self._membership

    def snapshot(self) -> RoutingTable:
        """The current routing table; rebuilt only when something changed since the last call."""
        if not self._changed and self._table.membership_version == self._membership:
            return self._table
        for node_id in self._changed:
            rec = self.nodes.get(node_id)
            if rec is None or not rec.routable:
                continue
            f, ld = rec.facts, rec.load
            self._entries[node_id] = NodeEntry(
                node_id, rec.url, f.region, f.zone, tuple(f.models), rec.weight, f.max_batch_size,
                ld.queue_depth, ld.in_flight, ld.p50_ms, ld.p99_ms,
            )
        self._changed.clear()
        self._version += 1
        self._table = RoutingTable(self._version, self._membership, tuple(self._entries.values()))
        return self._table

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in NodeState}
        for rec in self.nodes.values():
            out[rec.state.value] += 1
        return out
