"""Transport parity: one table of requests, answered by every CPU transport through `gazsi edge serve`
with the real ONNX engine. Same status, same error bodies, same headers that matter; vectors equal to
float noise (a batch's padding may differ between runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.support.edge import TRANSPORTS, EdgeProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def edges(edge_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EdgeProcess]]:
    cfg = tmp_path_factory.mktemp("parity") / "edge.yaml"
    cfg.write_text("limits: {max_inputs_per_request: 64, max_input_chars: 5000, max_body_bytes: 65536}\n"
                   "cache: {enabled: false}\n")
    started: dict[str, EdgeProcess] = {}
    env = {"GAZSI_CONFIG": str(cfg)}
    try:
        for dataplane in TRANSPORTS:
            started[dataplane] = EdgeProcess(edge_data_dir, "--dataplane", dataplane, "--workers", "2",
                                             "--backend", "onnx-cpu", "--no-auth", env=env)
        yield started
    finally:
        for proc in started.values():
            proc.stop()


CASES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("GET", "/inference?d=hello%20world", None, {}),
    ("GET", "/inference?d=a&d=last%20one%20wins", None, {}),
    ("GET", "/inference", None, {}),
    ("GET", "/inference?d=", None, {}),
    ("POST", "/inference?d=x", None, {}),
    ("HEAD", "/inference?d=x", None, {}),
    ("POST", "/v1/embeddings", {"input": "one sentence", "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": ["a b c", "d e", "f"], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": [101, 2023, 2003], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": [[2023, 2003], [7592]], "model": MODEL, "encoding_format": "base64"}, {}),
    ("POST", "/v1/embeddings", {"input": "shorter", "model": MODEL, "dimensions": 8}, {}),
    ("POST", "/v1/embeddings", {"input": [f"sentence number {i}" for i in range(40)], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": "embedding " * 400, "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": "Ünïcödé ✓ 漢字 🚀", "model": MODEL}, {"x-gazsi-timing": "0"}),
    ("POST", "/v1/embeddings", {"input": "x", "model": "nope"}, {}),
    ("POST", "/v1/embeddings", {"input": "x", "model": MODEL, "dimensions": 0}, {}),
    ("POST", "/v1/embeddings", {"input": "x", "model": MODEL, "dimensions": 385}, {}),
    ("POST", "/v1/embeddings", {"input": "x", "model": MODEL, "encoding_format": "int8"}, {}),
    ("POST", "/v1/embeddings", {"input": "", "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": ["ok", ""], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": [], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": 3, "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": [1, "a"], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": [[]], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": ["x"] * 65, "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": "x" * 5001, "model": MODEL}, {}),
    ("POST", "/v1/embeddings", {"input": [[999999]], "model": MODEL}, {}),
    ("POST", "/v1/embeddings", b'{"input": "\\ud800 lone surrogate", "model": "all-MiniLM-L6-v2"}', {}),
    ("POST", "/v1/embeddings", b"{not json", {}),
    ("POST", "/v1/embeddings", b"\xff\xfe\x00garbage", {}),
    ("POST", "/v1/embeddings", b"[1, 2]", {}),
    ("POST", "/v1/embeddings", b"", {}),
    ("POST", "/v1/embeddings", b"x" * 70000, {}),
    ("GET", "/v1/embeddings", None, {}),
    ("GET", "/v1/models", None, {}),
    ("GET", "/no/such/route", None, {}),
    ("GET", "/healthz", None, {}),
    ("GET", "/index.", None, {}),
    ("GET", "/contacts.", None, {}),
]
# Headers whose values every transport must agree on (transport framing like date/server aside).
SAME_HEADERS = ("content-type", "retry-after", "www-authenticate", "x-gazsi-cache")


def _normalised(resp: httpx.Response) -> tuple[int, Any, np.ndarray | None]:
    """(status, body without floats and timings, the floats) of one answer."""
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return resp.status_code, resp.content, None
    floats: list[Any] = []
    if isinstance(body, dict):
        body.pop("inference_time_us", None)
        body.pop("batch_size", None)
        if "embedding_sample" in body:
            floats.append(body.pop("embedding_sample"))
        for item in body.get("data", []) if body.get("object") == "list" else []:
            item.pop("created", None)  # when each node started
            emb = item.get("embedding")
            if isinstance(emb, list):
                floats.append(item.pop("embedding"))
            elif isinstance(emb, str):
                import base64

                floats.append(np.frombuffer(base64.b64decode(item.pop("embedding")), dtype="<f4").tolist())
    vec = np.array([x for f in floats for x in f], dtype=np.float64) if floats else None
    return resp.status_code, body, vec


@pytest.mark.parametrize(("method", "path", "body", "headers"), CASES,
                         ids=[f"{i}-{m}-{p[:28]}" for i, (m, p, _, _) in enumerate(CASES)])
def test_every_transport_answers_alike(edges: dict[str, EdgeProcess], method: str, path: str, body: Any,
                                       headers: dict[str, str]) -> None:
    content = body if isinstance(body, bytes) else (orjson.dumps(body) if body is not None else None)
    hdrs = {"content-type": "application/json", **headers} if content is not None else headers
    answers = {name: httpx.request(method, edge.url + path, content=content, headers=hdrs, timeout=60)
               for name, edge in edges.items()}
    (ref_name, ref), *others = answers.items()
    ref_status, ref_body, ref_vec = _normalised(ref)
    if ref_status == 200 and method != "HEAD" and path.startswith(("/v1/embeddings", "/inference")):
        assert ref_vec is not None and np.isfinite(ref_vec).all()
    for name, got in others:
        status, got_body, vec = _normalised(got)
        assert (status, got_body) == (ref_status, ref_body), f"{name} vs {ref_name}"
        if ref_vec is not None:
            assert vec is not None and np.allclose(vec, ref_vec, atol=1e-5), f"{name} vectors differ"
        for h in SAME_HEADERS:
            assert got.headers.get(h) == ref.headers.get(h), f"{name} header {h}"
        if method == "HEAD":
            assert got.content == b"" and got.headers.get("content-length") == ref.headers.get("content-length")


def test_bodies_are_byte_identical_where_deterministic(edges: dict[str, EdgeProcess]) -> None:
    """Errors and fixed pages carry no floats: every transport sends the very same body bytes."""
    for method, path, body in (("GET", "/inference", None), ("POST", "/v1/embeddings", b"{not json"),
                               ("GET", "/nowhere", None), ("GET", "/index.", None)):
        bodies = {httpx.request(method, e.url + path, content=body, timeout=30).content for e in edges.values()}
        assert len(bodies) == 1, bodies


def test_server_timing_on_every_transport(edges: dict[str, EdgeProcess]) -> None:
    for name, edge in edges.items():
        r = httpx.get(edge.url + "/inference", params={"d": "time me"}, headers={"x-gazsi-timing": "1"}, timeout=30)
        stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
        assert {"tokenize", "queue", "inference", "serialize", "total"} <= set(stages), (name, stages)


def test_metrics_count_requests_of_every_process(edges: dict[str, EdgeProcess]) -> None:
    for name, edge in edges.items():
        for i in range(6):
            httpx.get(edge.url + "/inference", params={"d": f"count {i}"}, timeout=30)
        text = httpx.get(edge.admin + "/metrics", timeout=30).text
        line = next(ln for ln in text.splitlines()
                    if ln.startswith('gazsi_requests_total{route="/inference",status="200"}'))
        assert float(line.split()[-1]) >= 6, (name, line)
        assert "gazsi_batch_size_bucket" in text and "gazsi_tokens_total" in text, name
