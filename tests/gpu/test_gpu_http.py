"""GPU HTTP kernels and control-flow modes on a real GPU (skipped without one)."""

from __future__ import annotations

import time

import h11
import numpy as np
import pytest

from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu._reference import parse_reference
from tests.support.gpu_compare import normalise, row_to_parsed
from tests.support.http_fuzz import fuzz_requests

cp = pytest.importorskip("cupy", reason="CuPy is not installed (GPU data plane tests need a CUDA GPU)")
try:
    _N_GPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _N_GPU = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_N_GPU == 0, reason="no CUDA GPU on this machine")]


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    from edge_node.transports.gpu.kernels import GpuHttpEngine

    return GpuHttpEngine(1024)


def _compare(results: np.ndarray, dbuf: np.ndarray, reqs: list[bytes]) -> list[tuple[bytes, object, object]]:
    bad = []
    for i, raw in enumerate(reqs):
        got = row_to_parsed(results[i], dbuf[i].tobytes())
        want = normalise(parse_reference(raw))
        if got != want:
            bad.append((raw[:160], got, want))
    return bad


def test_parse_kernel_matches_reference_on_fuzzed_requests(engine) -> None:  # type: ignore[no-untyped-def]
    reqs = fuzz_requests(8192, seed=2026)
    bad = []
    for start in range(0, len(reqs), 1024):
        chunk = reqs[start:start + 1024]
        results, dbuf = engine.parse(chunk)
        bad += _compare(results, dbuf, chunk)
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"


def test_built_responses_parse_back_and_match_socket_body(engine) -> None:  # type: ignore[no-untyped-def]
    from edge_node.encode import inference_body
    from edge_node.transports.gpu.kernels import jobs_for

    texts = ["hello world", 'quote " back\\slash', "ctrl \x01\x1f\t\n\r", "naïve 日本語 😀", "a" * L.D_MAX]
    from urllib.parse import quote

    reqs = [f"GET /inference?d={quote(t, safe='')} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for t in texts]
    reqs += [b"GET /index. HTTP/1.1\r\n\r\n", b"HEAD /contacts. HTTP/1.0\r\n\r\n", b"GET /nope HTTP/1.1\r\n\r\n",
             b"PUT /index. HTTP/1.1\r\n\r\n", b"GET /inference?d=%ZZ HTTP/1.1\r\nConnection: close\r\n\r\n"]
    results, _ = engine.parse(reqs)
    n = len(reqs)
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((n, 3)).astype(np.float32)
    samples[0] = [-0.0, 1e-7, 0.5000005]
    samples[1] = [np.nan, -1.0, 0.1234565]
    tokens, infer_us, batch = list(range(3, 3 + n)), [123 * i for i in range(n)], [1 + i % 8 for i in range(n)]
    responses = engine.build(jobs_for(results, tokens, infer_us, batch), samples)
    for i, resp in enumerate(responses):
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="HEAD" if reqs[i].startswith(b"HEAD") else "GET", target="/", headers=[("Host", "h")]))
        conn.receive_data(resp)
        head = conn.next_event()
        assert isinstance(head, h11.Response), resp[:200]
        body = b""
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.Data):
                body += ev.data
            else:
                break
        assert isinstance(ev, h11.EndOfMessage)
        status = int(results[i, L.R_STATUS])
        assert head.status_code == status
        if i < len(texts):
            assert body == inference_body(texts[i], tokens[i], samples[i], infer_us[i], batch[i])
    assert responses[5].endswith(__import__("edge_node.pages", fromlist=["x"]).INDEX_HTML)
    assert responses[6][-4:] == b"\r\n\r\n"  # HEAD: headers only
    assert b'"message":"Not Found"' in responses[7] and b"405 Method Not Allowed" in responses[8]
    assert b"connection: close" in responses[9]


@pytest.mark.parametrize("mode", ["launch", "persistent", "memops"])
def test_control_flow_mode_start_run_stop(mode: str) -> None:
    from edge_node.transports.gpu.control import make_runner

    runner = make_runner(mode, 1024, timeout_s=10.0)
    try:
        for burst, size in enumerate([16, 1024, 64, 1]):
            reqs = fuzz_requests(size, seed=100 + burst)
            results, dbuf = runner.run(reqs)
            assert not _compare(results, dbuf, reqs)
        assert runner.bursts == 4
    finally:
        started = time.perf_counter()
        runner.stop()
    assert time.perf_counter() - started < 10  # stop is bounded: it returned at all
    assert int(runner.ctrl.array[5]) == 0  # no resident kernel left running
    runner.close()


def test_persistent_kernel_exits_on_its_own_when_idle() -> None:
    from edge_node.transports.gpu.control import PersistentRunner

    runner = PersistentRunner(64, max_idle_s=0.2, timeout_s=10.0)
    runner.start()
    runner.stream.synchronize()  # returns only because the kernel idled out
    assert int(runner.ctrl.array[5]) == 0
    results, _ = runner.run([b"GET /index. HTTP/1.1\r\n\r\n"])  # restarts it
    assert int(results[0, L.R_STATUS]) == 200
    runner.close()
