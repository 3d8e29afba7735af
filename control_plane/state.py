"""Node records and the liveness state machine.

    joining ──first heartbeat──▶ healthy ──missed N──▶ suspect ──missed M──▶ dead ──grace──▶ removed
       ▲                           ▲  │                   │
       └──── re-join ──────────────┘  └─ drain ▶ draining ┘ (a heartbeat brings suspect back)

Only ``healthy`` nodes are routed to. Suspect nodes leave the table at once: at default
settings (1 s heartbeats, suspect after 2 missed) a vanished node is out of every table
about 2 s after its last heartbeat, so the 3 s promise holds even with a table pull in between.
Draining nodes get no new traffic but stay listed until they leave or are removed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gazsi_cluster.protocol import NodeFacts, NodeLoad

__all__ = ["NodeRecord", "NodeState", "Thresholds"]


class NodeState(enum.StrEnum):
    JOINING = "joining"
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DEAD = "dead"
    DRAINING = "draining"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Liveness thresholds in seconds, derived from the heartbeat interval and missed counts."""

    interval_s: float = 1.0
    suspect_after_missed: int = 2
    dead_after_missed: int = 3
    # Dead nodes are kept this long (for `gazsi nodes list`) before they are removed.
    removed_after_s: float = 60.0
    # A node that joined but never sent a heartbeat is dropped after this long.
    join_timeout_s: float = 10.0

    @property
    def suspect_s(self) -> float:
        return self.interval_s * self.suspect_after_missed

    @property
    def dead_s(self) -> float:
        return self.interval_s * self.dead_after_missed


@dataclass(slots=True, eq=False)
class NodeRecord:
    node_id: str
    facts: NodeFacts
    joined_at: float
    last_heartbeat: float
    state: NodeState = NodeState.JOINING
    state_since: float = 0.0
    load: NodeLoad = field(default_factory=lambda: NodeLoad.model_validate({}))
    heartbeats: int = 0
    weight: int = 1
    # Set by an operator's drain; a node's own draining flag is in ``load.draining``.
    drain_requested: bool = False

    @property
    def url(self) -> str:
        if self.facts.reach == "tunnel":  # nobody can dial it: gateways relay through the tunnel it opened
            return f"tunnel://{self.node_id}"
        host = self.facts.address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        return f"{self.facts.scheme}://{host}:{self.facts.port}"

    @property
    def routable(self) -> bool:
        return self.state is NodeState.HEALTHY

    def set_state(self, state: NodeState, now: float) -> NodeState | None:
        """Move to ``state``; returns the previous state when it changed, else None."""
        if state is self.state:
            return None
        prev, self.state, self.state_since = self.state, state, now
        return prev

    def on_heartbeat(self, load: NodeLoad, now: float) -> NodeState | None:
        """Record a heartbeat; returns the previous state when the state changed."""
        self.load = load
        self.last_heartbeat = now
        self.heartbeats += 1
        if self.state is NodeState.REMOVED:
            return None  # removed nodes must re-join; the registry refuses their heartbeats
        if self.drain_requested or load.draining:
            return self.set_state(NodeState.DRAINING, now)
        return self.set_state(NodeState.HEALTHY, now)

    def evaluate(self, now: float, t: Thresholds) -> NodeState | None:
        """Apply the clock to the state; returns the previous state when it changed."""
        silent = now - self.last_heartbeat
        if self.state is NodeState.REMOVED:
            return None
        if self.state is NodeState.DEAD:
            if now - self.state_since >= t.removed_after_s:
                return self.set_state(NodeState.REMOVED, now)
            return None
        if self.state is NodeState.JOINING:
            return self.set_state(NodeState.DEAD, now) if silent >= t.join_timeout_s else None
        if silent >= t.dead_s:
            return self.set_state(NodeState.DEAD, now)
        if silent >= t.suspect_s and self.state is NodeState.HEALTHY:
            return self.set_state(NodeState.SUSPECT, now)
        return None
