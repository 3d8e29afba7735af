"""Prometheus metrics of an edge node, each set in a registry of its own.

:class:`RequestMetrics` is kept by whichever process runs the request pipeline: the node process
on the ASGI and GPU transports, every worker of the fast front. Workers are started with
``PROMETHEUS_MULTIPROC_DIR`` set, so their values live in files that the node's ``/metrics``
reads with prometheus_client's ``MultiProcessCollector``: one scrape shows every process.
:class:`EngineMetrics` lives in the node process only (batches, engine, queue).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge_node.batcher import BatchStats

__all__ = ["STAGES", "EngineMetrics", "RequestMetrics"]

# GAZSI's T0..T8 breakdown, as stage names measured from the previous mark.
STAGES = ("tokenize", "queue", "wait_engine", "inference", "serialize", "total")

_LATENCY_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 10.0,
)


class RequestMetrics:
    """Per-request counters and per-stage latency (labels bound once: ``.labels()`` costs microseconds)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gazsi_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.stage_latency = Histogram(
            "gazsi_stage_latency_seconds", "Per-request stage latency (GAZSI T0..T8)", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter("gazsi_tokens", "Tokens embedded", registry=r)
        self.inputs = Counter("gazsi_inputs", "Inputs embedded", registry=r)
        self._stages = {s: self.stage_latency.labels(s) for s in STAGES}
        self._counters: dict[tuple[str, int], Counter] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(route, str(status))
        counter.inc()
        self._stages["total"].observe(seconds)

    def observe_work(self, stages: dict[str, float], tokens: int, inputs: int) -> None:
        for stage, seconds in stages.items():
            if stage != "total":
                self._stages[stage].observe(seconds)
        self.tokens.inc(tokens)
        self.inputs.inc(inputs)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineMetrics:
    """Batches, queue and engine of the node process (the observer of either batcher)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("gazsi_queue_depth", "Inputs (or ring slots) waiting for a batch", registry=r)
        self.in_flight = Gauge("gazsi_in_flight_requests", "Requests admitted and not finished", registry=r)
        self.batch_size = Histogram(
            "gazsi_batch_size", "Inputs per engine call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r,
        )
        self.padding_ratio = Histogram(
            "gazsi_batch_padding_ratio", "Padded tokens / real tokens per batch",
            buckets=(1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0), registry=r,
        )
        self.batch_wait = Histogram("gazsi_batch_wait_seconds", "From a batch formed to its engine call",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_inference = Histogram("gazsi_batch_inference_seconds", "Engine time per batch",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.engine_info = Gauge(
            "gazsi_engine_info", "Engine in use (value 1)", ["backend", "device", "dtype"], registry=r
        )

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        if stats.real_tokens:
            self.padding_ratio.observe(stats.padded_tokens / stats.real_tokens)
        self.batch_wait.observe(max(0.0, stats.infer_start - stats.formed_at))
        self.batch_inference.observe(max(0.0, stats.infer_end - stats.infer_start))

    def render(self) -> bytes:
        return generate_latest(self.registry)
