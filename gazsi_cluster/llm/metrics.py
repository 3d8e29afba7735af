"""Per-model Prometheus metrics of the LLM relay: time to first token, inter-token latency, tokens/s.

Kept with prometheus_client's own objects: an LLM request lasts milliseconds to minutes, so the
microseconds a labelled observation costs (what the embedding path's cells avoid) do not show.
Tokens are counted from the upstream's ``usage``; without one, each content chunk counts as one
completion token (llama.cpp and vLLM stream one token per chunk).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["LlmMetrics", "StreamClock"]

_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_TPS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class LlmMetrics:
    def __init__(self, prefix: str = "gazsi_llm") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{prefix}_requests", "LLM requests answered", ["model", "route", "status"],
                                registry=r)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "Request received to first content chunk",
                              ["model"], buckets=_TTFT, registry=r)
        self.itl = Histogram(f"{prefix}_inter_token_latency_seconds", "Gap between consecutive content chunks",
                             ["model"], buckets=_ITL, registry=r)
        self.tps = Histogram(f"{prefix}_tokens_per_second", "Completion tokens per second of generation, per "
                             "request", ["model"], buckets=_TPS, registry=r)
        self.tokens = Counter(f"{prefix}_tokens", "Tokens relayed", ["model", "kind"], registry=r)
        self.in_flight = Gauge(f"{prefix}_in_flight", "LLM requests being relayed", ["model"], registry=r)
        self.stream_errors = Counter(f"{prefix}_stream_errors", "Streams ended by an error event or a "
                                     "disconnect", ["model", "reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StreamClock:
    """The timing of one streamed answer: first content chunk, gaps between chunks, generation rate."""

    __slots__ = ("_itl", "_last", "first_at", "metrics", "model", "received")

    def __init__(self, metrics: LlmMetrics, model: str, received: float) -> None:
        self.metrics, self.model, self.received = metrics, model, received
        self.first_at: float | None = None
        self._last = 0.0
        self._itl: Any = None  # the model's child histogram, looked up once: labels() locks and hashes per call

    def content(self, chunks: int = 1) -> None:
        """``chunks`` content events just passed."""
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
            self.metrics.ttft.labels(self.model).observe(now - self.received)
            self._itl = self.metrics.itl.labels(self.model)
        else:
            self._itl.observe(now - self._last)
        self._last = now

    def finish(self, completion_tokens: int, prompt_tokens: int) -> None:
        m = self.metrics
        if completion_tokens:
            m.tokens.labels(self.model, "completion").inc(completion_tokens)
        if prompt_tokens:
            m.tokens.labels(self.model, "prompt").inc(prompt_tokens)
        if self.first_at is not None and completion_tokens > 1 and self._last > self.first_at:
            # Tokens after the first over the time they took: the decode rate, free of queueing and prefill.
            m.tps.labels(self.model).observe((completion_tokens - 1) / (self._last - self.first_at))
