"""Request metrics as plain cells: what one scrape shows, summed over processes, and kept over restarts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
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


def _reference(timing: Timing, tokens: int, inputs: int) -> RequestMetrics:
    """What observe_work must equal: every stage of Timing.stages() but total, into its histogram."""
    from bisect import bisect_left

    from edge_node import metrics as mod

    m = RequestMetrics()
    for name, seconds in timing.stages().items():
        if name != "total":
            stage = mod._STAGE_INDEX[name]
            m._q[mod._BASE[stage] + bisect_left(mod._LATENCY_BUCKETS, seconds)] += 1
            m._d[stage] += seconds
    m._q[mod._TOKENS] += tokens
    m._q[mod._INPUTS] += inputs
    return m


_MARK = st.one_of(st.just(0.0), st.floats(min_value=-1.0, max_value=20.0, allow_nan=False))


@given(st.lists(_MARK, min_size=7, max_size=7), st.integers(0, 10_000), st.integers(0, 64))
def test_observe_work_is_timing_stages_into_the_histograms(marks: list[float], tokens: int, inputs: int) -> None:
    """The unrolled path (every mark set) and the general one give what Timing.stages() defines."""
    timing = Timing(*marks)
    m = RequestMetrics()
    m.observe_work(timing, tokens, inputs)
    ref = _reference(timing, tokens, inputs)
    q, d = m.cells()
    rq, rd = ref.cells()
    assert (q == rq).all()
    assert d.tolist() == rd.tolist()


def test_a_status_out_of_range_counts_in_the_nearest_cell() -> None:
    m = RequestMetrics()
    m.observe("/healthz", 99, 0.001)
    m.observe("/healthz", 600, -1.0)
    assert m.count("/healthz", 100) == 1 and m.count("/healthz", 599) == 1
