"""Prometheus metrics of routing clients (gateways and edges): decisions, retries, hedges."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["RoutingMetrics"]


class RoutingMetrics:
    """Counters in the caller's registry (each app keeps its own, so several can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.decisions = Counter("gazsi_routing_decisions", "Routing decisions by policy", ["policy"], registry=r)
        self.retries = Counter("gazsi_routing_retries", "Requests retried on another node", registry=r)
        self.hedges = Counter("gazsi_routing_hedges", "Hedged second copies sent", registry=r)
        self.stale_table = Counter(
            "gazsi_routing_stale_table", "Decisions made on the last non-empty table (current one empty)", registry=r
        )
        self.failures = Counter(
            "gazsi_routing_attempt_failures", "Failed attempts by reason", ["reason"], registry=r
        )
