"""The transport parity table and its checks, shared by the CPU run (``tests/integration/edge/test_parity.py``)
and the GPU run (``tests/gpu/test_gpu_parity.py``): one table of cases, every transport, the real ONNX engine.

``edges`` maps a transport's name to a running :class:`tests.support.edge.EdgeProcess`; the first one is the
reference the others are compared with. The nodes are started with :data:`PARITY_CONFIG`.
"""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.support.edge import EdgeProcess

__all__ = [
    "CASES",
    "PARITY_CONFIG",
    "RAW_CASES",
    "SAME_HEADERS",
    "ParityTable",
    "check_case",
    "check_identical_bodies",
    "check_metrics",
    "check_raw_bytes",
    "check_server_timing",
    "comparable",
    "exchange",
    "normalised",
    "parity_edges",
]

MODEL = "all-MiniLM-L6-v2"
PARITY_CONFIG = ("limits: {max_inputs_per_request: 64, max_input_chars: 5000, max_body_bytes: 65536}\n"
                 "cache: {enabled: false}\n")

CASES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("GET", "/inference?d=hello%20world", None, {}),
    ("GET", "/inference?d=a&d=last%20one%20wins", None, {}),
    ("GET", "/inference", None, {}),
    ("GET", "/inference?d=", None, {}),
    ("GET", "/inference?d=%ZZ", None, {}),  # a broken escape: kept literally, as Python reads queries
    ("GET", "/inference?d=caf%C3%A9+au+lait", None, {}),
    ("GET", "/inference?d=%C3%28", None, {}),  # not UTF-8 after decoding
    ("GET", "/inference?%64=escaped%20name", None, {}),
    ("GET", "/inference?d=" + "long+" * 500, None, {}),  # longer than a GPU ring slot's d (2048 bytes)
    ("GET", "/inference?d=no%20cache", None, {"cache-control": "no-cache"}),
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
    ("HEAD", "/v1/models", None, {}),
    ("GET", "/no/such/route", None, {}),
    ("GET", "/healthz", None, {}),
    ("GET", "/index.", None, {}),
    ("GET", "/index.?x=1", None, {}),
    ("HEAD", "/contacts.", None, {}),
    ("GET", "/contacts.", None, {}),
    ("DELETE", "/contacts.", None, {}),
]
# Headers whose values every transport must agree on (transport framing like date/server aside).
SAME_HEADERS = ("content-type", "retry-after", "www-authenticate", "x-gazsi-cache")

_CLOSE = b"Connection: close\r\n\r\n"
_JSON = b'{"input": "raw bytes", "model": "all-MiniLM-L6-v2"}'
# Whole exchanges for the transports that write bytes themselves (the fast front, the gpu plane): the
# same bytes back, timings and float noise aside. Each ends its connection, so the answer is read to EOF.
RAW_CASES: list[bytes] = [
    b"GET /inference?d=hello%20world HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"GET /inference?d=time+me HTTP/1.1\r\nHost: e\r\nX-Gazsi-Timing: 1\r\n" + _CLOSE,
    b"HEAD /inference?d=x HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"GET /inference HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"GET /inference?d=%ZZ HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"GET /inference?d=a%23b#fragment HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"GET /inference?d=with+body HTTP/1.1\r\nHost: e\r\nContent-Length: 3\r\n" + _CLOSE + b"abc",
    b"GET /inference?d=two&d=auth HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n" + _CLOSE,
    b"GET /inference?d=old HTTP/1.0\r\n\r\n",
    b"GET /index. HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"HEAD /contacts. HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"GET /nope HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    b"PUT /index. HTTP/1.1\r\nHost: e\r\nContent-Length: 0\r\n" + _CLOSE,
    b"POST /v1/embeddings HTTP/1.1\r\nHost: e\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    % len(_JSON) + _CLOSE + _JSON,
    b"POST /v1/embeddings HTTP/1.1\r\nHost: e\r\nExpect: 100-continue\r\nContent-Length: %d\r\n" % len(_JSON)
    + _CLOSE + _JSON,
    b"POST /v1/embeddings HTTP/1.1\r\nHost: e\r\nContent-Length: 70000\r\n" + _CLOSE + b"x" * 70000,
    b"GET /v1/models HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    # pipelined: answered in order on one connection
    b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\nGET /inference?d=second HTTP/1.1\r\nHost: e\r\n\r\n"
    b"GET /index. HTTP/1.1\r\nHost: e\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
    # listener limits (the defaults: 100 header fields, 16 KiB of headers)
    b"GET /inference?d=x HTTP/1.1\r\nHost: e\r\n" + b"X-Many: 1\r\n" * 100 + _CLOSE,
    b"GET /inference?d=x HTTP/1.1\r\nHost: e\r\n" + b"X-Many: 1\r\n" * 80 + _CLOSE,
    b"GET /inference?d=x HTTP/1.1\r\nHost: e\r\nX-Big: " + b"b" * 17000 + b"\r\n" + _CLOSE,
    b"GET /inference?d=x HTTP/1.1\r\nHost: e\r\nX-Big: " + b"b" * 9000 + b"\r\n" + _CLOSE,  # > a kernel slot
    b"GET /x HTTP/1.1\nHost: e\n\n",  # bare LF
    b"GET /inference?d=x HTTP/1.1\r\nHost: e\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"BREW /index. HTTP/1.1\r\nHost: e\r\n" + _CLOSE,
]

_FLOATS = re.compile(rb'"(embedding_sample|embedding)":\[([^\]]*)\]')
_VARYING = [(re.compile(rb'"inference_time_us":\d+'), b'"inference_time_us":#'),
            (re.compile(rb"content-length: \d+"), b"content-length: #"), (re.compile(rb"dur=[\d.]+"), b"dur=#"),
            (re.compile(rb'"created":\d+'), b'"created":#'),  # when each node started
            (re.compile(rb"(x-ratelimit-reset-[a-z]+): [\d.]+s"), rb"\1: #")]  # a clock


def normalised(resp: httpx.Response) -> tuple[int, Any, np.ndarray | None]:
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
                floats.append(np.frombuffer(base64.b64decode(item.pop("embedding")), dtype="<f4").tolist())
    vec = np.array([x for f in floats for x in f if x is not None], dtype=np.float64) if floats else None
    return resp.status_code, body, vec


def check_case(edges: dict[str, EdgeProcess], method: str, path: str, body: Any, headers: dict[str, str]) -> None:
    """One row of :data:`CASES`: same status, same body (floats to noise), same headers that matter."""
    content = body if isinstance(body, bytes) else (orjson.dumps(body) if body is not None else None)
    hdrs = {"content-type": "application/json", **headers} if content is not None else headers
    answers = {name: httpx.request(method, edge.url + path, content=content, headers=hdrs, timeout=60)
               for name, edge in edges.items()}
    (ref_name, ref), *others = answers.items()
    ref_status, ref_body, ref_vec = normalised(ref)
    if ref_status == 200 and method != "HEAD" and path.startswith(("/v1/embeddings", "/inference")):
        assert ref_vec is not None and np.isfinite(ref_vec).all()
    for name, got in others:
        status, got_body, vec = normalised(got)
        assert (status, got_body) == (ref_status, ref_body), f"{name} vs {ref_name}"
        if ref_vec is not None:
            assert vec is not None and np.allclose(vec, ref_vec, atol=1e-5), f"{name} vectors differ"
        for h in SAME_HEADERS:
            assert got.headers.get(h) == ref.headers.get(h), f"{name} header {h}"
        if method == "HEAD":
            assert got.content == b"", name
            length, ref_length = got.headers.get("content-length"), ref.headers.get("content-length")
            if status == 200 and path.startswith("/inference"):
                # The body it stands for carries inference_time_us and batch_size: their digits vary by run.
                assert length is not None and ref_length is not None, name
                assert abs(int(length) - int(ref_length)) <= 4, (name, length, ref_length)
            else:
                assert length == ref_length, (name, length, ref_length)


def check_identical_bodies(edges: dict[str, EdgeProcess]) -> None:
    """Errors and fixed pages carry no floats: every transport sends the very same body bytes."""
    for method, path, body in (("GET", "/inference", None), ("POST", "/v1/embeddings", b"{not json"),
                               ("GET", "/nowhere", None), ("GET", "/index.", None), ("PUT", "/index.", None)):
        bodies = {name: httpx.request(method, e.url + path, content=body, timeout=30).content
                  for name, e in edges.items()}
        assert len(set(bodies.values())) == 1, bodies


def check_server_timing(edges: dict[str, EdgeProcess]) -> None:
    for name, edge in edges.items():
        for path in ("/inference?d=time%20me", "/v1/embeddings"):
            body = orjson.dumps({"input": "time me", "model": MODEL}) if path == "/v1/embeddings" else None
            r = httpx.request("POST" if body else "GET", edge.url + path, content=body,
                              headers={"x-gazsi-timing": "1"}, timeout=30)
            stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
            assert {"tokenize", "queue", "inference", "serialize", "total"} <= set(stages), (name, path, stages)
        r = httpx.get(edge.url + "/inference", params={"d": "no timing"}, timeout=30)
        assert "server-timing" not in r.headers, name


def check_metrics(edges: dict[str, EdgeProcess]) -> None:
    for name, edge in edges.items():
        for i in range(6):
            httpx.get(edge.url + "/inference", params={"d": f"count {i}"}, timeout=30)
        httpx.get(edge.url + "/index.", timeout=30)
        httpx.post(edge.url + "/v1/embeddings", json={"input": "count", "model": MODEL}, timeout=30)
        text = httpx.get(edge.admin + "/metrics", timeout=30).text
        for route in ("/inference", "/index.", "/v1/embeddings"):
            line = next(ln for ln in text.splitlines()
                        if ln.startswith(f'gazsi_requests_total{{route="{route}",status="200"}}'))
            assert float(line.split()[-1]) >= 1, (name, line)
        assert "gazsi_batch_size_bucket" in text and "gazsi_tokens_total" in text, name


def exchange(url: str, raw: bytes, timeout_s: float = 30.0) -> bytes:
    """Send ``raw`` on one new connection and read everything until the server closes it."""
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(raw)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def comparable(data: bytes) -> tuple[bytes, list[float]]:
    """A raw exchange without what may differ (timings, start times, lengths that follow), and its floats."""
    floats: list[float] = []

    def cut(m: re.Match[bytes]) -> bytes:
        floats.extend(float(x) for x in m[2].split(b",") if x and x != b"null")
        return b'"' + m[1] + b'":[#]'

    data = _FLOATS.sub(cut, data)
    for pattern, repl in _VARYING:
        data = pattern.sub(repl, data)
    return data, floats


def check_raw_bytes(edges: dict[str, EdgeProcess], raw: bytes) -> None:
    """One of :data:`RAW_CASES` on the byte-writing transports: the same bytes (timings, float noise aside)."""
    answers = {name: exchange(edge.url, raw) for name, edge in edges.items()}
    (ref_name, ref), *others = answers.items()
    assert ref.startswith(b"HTTP/1.1 "), (ref_name, ref[:200])
    ref_bytes, ref_floats = comparable(ref)
    for name, got in others:
        got_bytes, got_floats = comparable(got)
        assert got_bytes == ref_bytes, (name, ref_name, got[:600], ref[:600])
        assert np.allclose(got_floats, ref_floats, atol=1e-5), (name, "floats differ")


@contextmanager
def parity_edges(data_dir: Path, cfg_dir: Path, nodes: dict[str, tuple[list[str], list[str] | None]]
                 ) -> Iterator[dict[str, EdgeProcess]]:
    """Start one edge per entry (name -> (extra args, command or None for ``gazsi edge serve``)) on the
    real ONNX engine with :data:`PARITY_CONFIG`; stop them all afterwards."""
    cfg = cfg_dir / "edge.yaml"
    cfg.write_text(PARITY_CONFIG)
    env = {"GAZSI_CONFIG": str(cfg)}
    started: dict[str, EdgeProcess] = {}
    try:
        for name, (args, command) in nodes.items():
            started[name] = EdgeProcess(data_dir, *args, "--backend", "onnx-cpu", "--no-auth", env=env,
                                        command=command)
        yield started
    finally:
        for proc in started.values():
            proc.stop()


class ParityTable:
    """The parity tests, run by a ``Test…`` subclass in a module that provides an ``edges`` fixture
    (name -> running edge) and names the byte-writing transports whose raw bytes must agree."""

    BYTE_TRANSPORTS: tuple[str, ...] = ("fast", "gpu-reference")

    @pytest.mark.parametrize(("method", "path", "body", "headers"), CASES,
                             ids=[f"{i}-{m}-{p[:28]}" for i, (m, p, _, _) in enumerate(CASES)])
    def test_every_transport_answers_alike(self, edges: dict[str, EdgeProcess], method: str, path: str,
                                           body: Any, headers: dict[str, str]) -> None:
        check_case(edges, method, path, body, headers)

    @pytest.mark.parametrize("raw", RAW_CASES, ids=[f"{i}-{r[:24]!r}" for i, r in enumerate(RAW_CASES)])
    def test_byte_transports_send_the_same_bytes(self, edges: dict[str, EdgeProcess], raw: bytes) -> None:
        check_raw_bytes({name: edges[name] for name in self.BYTE_TRANSPORTS}, raw)

    def test_bodies_are_byte_identical_where_deterministic(self, edges: dict[str, EdgeProcess]) -> None:
        check_identical_bodies(edges)

    def test_server_timing_on_every_transport(self, edges: dict[str, EdgeProcess]) -> None:
        check_server_timing(edges)

    def test_metrics_count_requests_of_every_process(self, edges: dict[str, EdgeProcess]) -> None:
        check_metrics(edges)
