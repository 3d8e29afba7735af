"""Prometheus metrics of the auth layer, in a registry of its own (the edge renders it beside its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["AuthMetrics"]


class AuthMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "gazsi_auth_decisions", "Authorization outcomes", ["result"], registry=r
        )
        self.lookups = Counter(
            "gazsi_auth_key_lookups", "Where a key's record came from", ["source"], registry=r
        )
        self.degraded = Gauge(
            "gazsi_auth_dependency_degraded", "1 while a dependency is failing", ["dependency"], registry=r
        )
        self.usage_dropped = Counter(
            "gazsi_usage_rows_dropped", "Usage increments dropped because the buffer was full", registry=r
        )
        self.usage_flushes = Counter("gazsi_usage_flushes", "Usage batch writes", ["result"], registry=r)
        self.revocations = Counter(
            "gazsi_auth_revocations_received", "Key change messages applied from Redis", registry=r
        )
        self.key_events = Counter(
            "gazsi_auth_key_events", "Key changes applied from the store's change feed", ["kind"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
