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
_STATUS_HI = _STATUS_LO + _STATUSES
_ROUTE_INDEX = {r: i * _STATUSES for i, r in enumerate(ROUTES)}
_UNMATCHED = _ROUTE_INDEX["unmatched"]
_NB = len(_LATENCY_BUCKETS) + 1
_STAGE_INDEX = {name: i for i, name in enumerate(STAGES)}
_TOKENIZE, _QUEUE, _WAIT_ENGINE, _INFERENCE, _SERIALIZE, _TOTAL = (_STAGE_INDEX[s] for s in STAGES)
# int64 cells: requests[route][status], stage buckets[stage][bucket] (not cumulative), tokens, inputs.
_REQ, _BUCKETS = 0, len(ROUTES) * _STATUSES
_TOKENS = _BUCKETS + len(STAGES) * _NB
_INPUTS = _TOKENS + 1
_CELLS = _INPUTS + 1
_SUMS = len(STAGES)  # float64 cells after the int64 ones: each stage's sum of seconds
_BASE = tuple(_BUCKETS + s * _NB for s in range(len(STAGES)))  # each stage's first bucket cell
_B_TOKENIZE, _B_QUEUE, _B_WAIT_ENGINE, _B_INFERENCE, _B_SERIALIZE, _B_TOTAL = _BASE


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
        if not _STATUS_LO <= status < _STATUS_HI:
            status = _STATUS_LO if status < _STATUS_LO else _STATUS_HI - 1
        q = self._q
        q[_ROUTE_INDEX.get(route, _UNMATCHED) + status - _STATUS_LO] += 1
        if seconds < 0.0:
            seconds = 0.0
        q[_B_TOTAL + bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self._d[_TOTAL] += seconds

    def observe_work(self, timing: Timing, tokens: int, inputs: int) -> None:
        """The stages of one served request as :meth:`Timing.stages` defines them (``total`` is :meth:`observe`'s).

        This runs with every request in a fast-front worker, so a request the engine served (every mark
        set) is read from the marks directly, not through ``stages()``'s dict and a method call per stage
        (issue 13: those cost more than the histogram writes themselves); a unit test holds the two equal.
        """
        q, d = self._q, self._d
        q[_TOKENS] += tokens
        q[_INPUTS] += inputs
        t = timing
        if not (t.formed and t.tokenized and t.infer_end and t.serialized):
            for name, sec in t.stages().items():
                if name != "total":
                    stage = _STAGE_INDEX[name]
                    q[_BASE[stage] + bisect_left(_LATENCY_BUCKETS, sec)] += 1
                    d[stage] += sec
            return
        # Unrolled (a loop over (stage, seconds) pairs cost a third more); max(0, s) as in stages().
        s = t.tokenized - t.received
        s = s if s > 0.0 else 0.0
        q[_B_TOKENIZE + bisect_left(_LATENCY_BUCKETS, s)] += 1
        d[_TOKENIZE] += s
        s = t.formed - t.queued
        s = s if s > 0.0 else 0.0
        q[_B_QUEUE + bisect_left(_LATENCY_BUCKETS, s)] += 1
        d[_QUEUE] += s
        s = t.infer_start - t.formed
        s = s if s > 0.0 else 0.0
        q[_B_WAIT_ENGINE + bisect_left(_LATENCY_BUCKETS, s)] += 1
        d[_WAIT_ENGINE] += s
        s = t.infer_end - t.infer_start
        s = s if s > 0.0 else 0.0
        q[_B_INFERENCE + bisect_left(_LATENCY_BUCKETS, s)] += 1
        d[_INFERENCE] += s
        s = t.serialized - t.infer_end
        s = s if s > 0.0 else 0.0
        q[_B_SERIALIZE + bisect_left(_LATENCY_BUCKETS, s)] += 1
        d[_SERIALIZE] += s

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
