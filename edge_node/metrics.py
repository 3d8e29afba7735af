"""Prometheus metrics of an edge node.

:class:`RequestMetrics` is kept by whichever process runs the request pipeline: the node process on
the ASGI and GPU transports, every worker of the fast front. Its values are plain int64/float64 cells
in a buffer (the fast front's workers each get theirs in the ring's shared memory), so a request
costs a few memory writes. prometheus_client's own metric objects cost ~20 us per request in a
worker (multiprocess mode: a lock, a ``getpid`` system call and an mmap write per value, about fifteen
values per request; H200 and 2-core profiles of issue 13). :func:`request_families` sums any number of
such buffers at scrape time, so one scrape of the node shows every process, fresh, and a restarted
worker continues its predecessor's counts (the cells outlive the process).
:class:`EngineMetrics` lives in the node process only (batches, engine, queue).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from edge_node.batcher import BatchStats

if TYPE_CHECKING:
    from edge_node.embedders import Timing

__all__ = ["ROUTES", "STAGES", "EngineMetrics", "RequestMetrics", "render_request_metrics", "request_families"]

# GAZSI's T0..T8 breakdown, as stage names measured from the previous mark.
STAGES = ("tokenize", "queue", "wait_engine", "inference", "serialize", "total")
# The route label of every request the pipeline answers (a path it does not serve is "unmatched").
ROUTES = ("/v1/embeddings", "/inference", "/v1/models", "/healthz", "/readyz", "/index.", "/contacts.",
          "/v1/chat/completions", "/v1/completions", "unmatched")

_LATENCY_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 10.0,
)
_LE = [floatToGoString(b) for b in _LATENCY_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
_STATUS_LO, _STATUSES = 100, 500  # one cell per HTTP status 100..599
_ROUTE_INDEX = {r: i * _STATUSES for i, r in enumerate(ROUTES)}
_NB = len(_LATENCY_BUCKETS) + 1
_STAGE_INDEX = {name: i for i, name in enumerate(STAGES)}
_TOTAL = _STAGE_INDEX["total"]
# int64 cells: requests[route][status], stage buckets[stage][bucket] (not cumulative), tokens, inputs.
_REQ, _BUCKETS = 0, len(ROUTES) * _STATUSES
_TOKENS = _BUCKETS + len(STAGES) * _NB
_INPUTS = _TOKENS + 1
_CELLS = _INPUTS + 1
_SUMS = len(STAGES)  # float64 cells after the int64 ones: each stage's sum of seconds


class RequestMetrics:
    """Per-request counters and per-stage latency in a buffer of :attr:`NBYTES` (a private one by default).

    >>> m = RequestMetrics(); m.observe("/healthz", 200, 0.001); m.count("/healthz", 200)
    1
    """

    NBYTES = _CELLS * 8 + _SUMS * 8

    def __init__(self, buffer: memoryview | None = None) -> None:
        raw = memoryview(bytearray(self.NBYTES)) if buffer is None else buffer
        if raw.nbytes < self.NBYTES:
            raise ValueError(f"a RequestMetrics buffer needs {self.NBYTES} bytes, got {raw.nbytes}")
        raw = raw.cast("B")[: self.NBYTES]
        # memoryview item writes are the cheapest typed store Python has (numpy scalar writes cost more).
        self._q = raw[: _CELLS * 8].cast("q")
        self._d = raw[_CELLS * 8:].cast("d")

    def observe(self, route: str, status: int, seconds: float) -> None:
        base = _ROUTE_INDEX.get(route, _ROUTE_INDEX["unmatched"])
        self._q[base + min(max(status, _STATUS_LO), _STATUS_LO + _STATUSES - 1) - _STATUS_LO] += 1
        self._stage(_TOTAL, seconds)

    def observe_work(self, timing: Timing, tokens: int, inputs: int) -> None:
        """The stages of one served request as :meth:`Timing.stages` defines them (``total`` is :meth:`observe`'s)."""
        stage = self._stage
        for name, seconds in timing.stages().items():
            if name != "total":
                stage(_STAGE_INDEX[name], seconds)
        q = self._q
        q[_TOKENS] += tokens
        q[_INPUTS] += inputs

    def _stage(self, stage: int, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self._q[_BUCKETS + stage * _NB + bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self._d[stage] += seconds

    def count(self, route: str, status: int) -> int:
        return int(self._q[_ROUTE_INDEX[route] + status - _STATUS_LO])

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the (int64, float64) cells: what a scrape sums."""
        return np.array(self._q, dtype=np.int64), np.array(self._d, dtype=np.float64)

    def release(self) -> None:
        """Let go of the buffer (a shared-memory block cannot close while views of it live)."""
        self._q.release()
        self._d.release()

    def render(self) -> bytes:
        return render_request_metrics([self])


def request_families(parts: Iterable[RequestMetrics]) -> Iterator[Metric]:
    """The Prometheus families of the sum of ``parts`` (every process of one node)."""
    q = np.zeros(_CELLS, dtype=np.int64)
    d = np.zeros(_SUMS, dtype=np.float64)
    for part in parts:
        pq, pd = part.cells()
        q += pq
        d += pd
    requests = CounterMetricFamily("gazsi_requests", "HTTP requests by route and status", labels=["route", "status"])
    for i in np.flatnonzero(q[_REQ:_BUCKETS]):
        route, status = divmod(int(i), _STATUSES)
        requests.add_metric([ROUTES[route], str(status + _STATUS_LO)], float(q[i]))
    yield requests
    latency = HistogramMetricFamily("gazsi_stage_latency_seconds", "Per-request stage latency (GAZSI T0..T8)",
                                    labels=["stage"])
    for s, stage in enumerate(STAGES):
        counts = np.cumsum(q[_BUCKETS + s * _NB: _BUCKETS + (s + 1) * _NB])
        latency.add_metric([stage], list(zip(_LE, (float(c) for c in counts), strict=True)), float(d[s]))
    yield latency
    yield CounterMetricFamily("gazsi_tokens", "Tokens embedded", value=float(q[_TOKENS]))
    yield CounterMetricFamily("gazsi_inputs", "Inputs embedded", value=float(q[_INPUTS]))


class _Families:
    def __init__(self, parts: Iterable[RequestMetrics]) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        return request_families(self.parts)


def render_request_metrics(parts: Iterable[RequestMetrics]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(parts))
    return generate_latest(registry)


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
