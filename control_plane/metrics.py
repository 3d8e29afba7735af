"""Prometheus metrics of the control plane, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from control_plane.registry import NodeEvent
from control_plane.state import NodeRecord, NodeState
from gazsi_cluster.protocol import NodeLoad
from gazsi_cluster.routing.metrics import RoutingMetrics

__all__ = ["ControlPlaneMetrics"]


class ControlPlaneMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.nodes = Gauge("gazsi_cp_nodes", "Nodes by state", ["state"], registry=r)
        self.heartbeats = Counter("gazsi_cp_heartbeats", "Heartbeats accepted", registry=r)
        self.heartbeat_lag = Histogram(
            "gazsi_cp_heartbeat_lag_seconds", "Time between a node's consecutive heartbeats",
            buckets=(0.25, 0.5, 0.9, 1.0, 1.1, 1.5, 2.0, 3.0, 5.0, 10.0), registry=r,
        )
        self.events = Counter("gazsi_cp_node_events", "Node events by kind", ["kind"], registry=r)
        self.rejected = Counter("gazsi_cp_rejected", "Rejected joins/heartbeats by reason", ["reason"], registry=r)
        self.table_version = Gauge("gazsi_cp_table_version", "Routing table version", registry=r)
        self.table_nodes = Gauge("gazsi_cp_table_nodes", "Nodes in the routing table", registry=r)
        # /v1/route answers are routing decisions too; gateways count theirs in their own registry.
        self.routing = RoutingMetrics(r)

    # RegistrySink
    def event(self, event: NodeEvent, record: NodeRecord) -> None:
        self.events.labels(event.kind).inc()

    def sample(self, node_id: str, load: NodeLoad) -> None:
        self.heartbeats.inc()

    def set_counts(self, counts: dict[str, int]) -> None:
        for state in NodeState:
            self.nodes.labels(state.value).set(counts.get(state.value, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
