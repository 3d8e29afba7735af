"""Request metrics as plain cells: what one scrape shows, summed over processes, and kept over restarts."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from edge_node.embedders import Timing
from edge_node.metrics import ROUTES, RequestMetrics, render_request_metrics
from edge_node.pipeline import EdgePipeline, ModelFacts
from edge_node.transports.fast.ring import RingLayout, SlotRing


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = list(text_string_to_metric_families(text.decode()))
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _timing(received: float = 100.0) -> Timing:
    return Timing(received=received, tokenized=received + 0.0002, queued=received + 0.0004,
                  formed=received + 0.0008, infer_start=received + 0.001, infer_end=received + 0.004,
                  serialized=received + 0.0041)


def test_counts_stages_and_histogram_shape() -> None:
    m = RequestMetrics()
    for _ in range(3):
        m.observe("/v1/embeddings", 200, 0.0042)
        m.observe_work(_timing(), tokens=9, inputs=2)
    m.observe("/v1/embeddings", 429, 0.00001)
    m.observe("/nope", 404, 0.00002)  # a path the pipeline does not serve counts as "unmatched"
    s = _samples(m.render())
    req = "gazsi_requests_total"
    assert s[(req, (("route", "/v1/embeddings"), ("status", "200")))] == 3
    assert s[(req, (("route", "/v1/embeddings"), ("status", "429")))] == 1
    assert s[(req, (("route", "unmatched"), ("status", "404")))] == 1
    assert s[("gazsi_tokens_total", ())] == 27 and s[("gazsi_inputs_total", ())] == 6

    def bucket(stage: str, le: str) -> float:
        return s[("gazsi_stage_latency_seconds_bucket", (("le", le), ("stage", stage)))]

    # total: 3 x 4.2 ms and 2 tiny ones; cumulative buckets, +Inf = count.
    assert bucket("total", "5e-05") == 2 and bucket("total", "0.002") == 2 and bucket("total", "0.005") == 5
    assert bucket("total", "+Inf") == s[("gazsi_stage_latency_seconds_count", (("stage", "total"),))] == 5
    # inference = 3 ms each, queue = 0.4 ms each.
    assert bucket("inference", "0.002") == 0 and bucket("inference", "0.005") == 3
    assert bucket("queue", "0.00025") == 0 and bucket("queue", "0.0005") == 3
    assert abs(s[("gazsi_stage_latency_seconds_sum", (("stage", "inference"),))] - 0.009) < 1e-9


def test_parts_sum_into_one_scrape() -> None:
    a, b = RequestMetrics(), RequestMetrics()
    a.observe("/inference", 200, 0.001)
    b.observe("/inference", 200, 0.001)
    b.observe("/inference", 503, 0.001)
    s = _samples(render_request_metrics([a, b]))
    assert s[("gazsi_requests_total", (("route", "/inference"), ("status", "200")))] == 2
    assert s[("gazsi_requests_total", (("route", "/inference"), ("status", "503")))] == 1


def test_worker_cells_live_in_the_ring_and_outlive_a_worker() -> None:
    layout = RingLayout(workers=2, slots_per_worker=4, slot_inputs=4, slot_tokens=64, dimensions=8)
    node = SlotRing.create(layout)
    try:
        worker = SlotRing.attach(layout, node.name)
        worker.worker_metrics(1).observe("/v1/embeddings", 200, 0.001)
        worker.close()  # the worker process goes away...
        again = SlotRing.attach(layout, node.name)
        again.worker_metrics(1).observe("/v1/embeddings", 200, 0.001)  # ...and its successor counts on
        views = [node.worker_metrics(w) for w in range(layout.workers)]
        assert [v.count("/v1/embeddings", 200) for v in views] == [0, 2]
        s = _samples(render_request_metrics(views))
        assert s[("gazsi_requests_total", (("route", "/v1/embeddings"), ("status", "200")))] == 2
        again.close()
    finally:
        node.close()


def test_every_pipeline_route_has_cells() -> None:
    pipeline = EdgePipeline(model=ModelFacts("m", 8, 0), rules=None, embedder=None,  # type: ignore[arg-type]
                            authorizer=None, metrics=RequestMetrics(), readiness=dict)  # type: ignore[arg-type]
    assert set(pipeline._routes) <= set(ROUTES)
