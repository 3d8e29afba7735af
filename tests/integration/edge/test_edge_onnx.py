"""The edge node end to end on loopback with the real model on ONNX Runtime CPU, on every CPU transport,
started the way users start it (`gazsi edge serve`)."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_node.tokenization import TextTokenizer
from gazsi_cluster.model import load_model_spec
from tests.support.edge import TRANSPORTS, EdgeProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "all-MiniLM-L6-v2"
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé ✓ 漢字 and emoji 🚀 survive tokenisation",
    "a",
    "embedding " * 400,  # truncated to the model's 256 tokens
]


@pytest.fixture(scope="module", params=TRANSPORTS)
def served(request, edge_data_dir, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("onnx") / "edge.yaml"
    cfg.write_text("limits: {max_inputs_per_request: 64, max_input_chars: 5000, max_body_bytes: 65536}\n")
    proc = EdgeProcess(edge_data_dir, "--dataplane", request.param, "--workers", "2", "--backend", "onnx-cpu",
                       "--no-auth", env={"GAZSI_CONFIG": str(cfg)})
    yield proc
    proc.stop()


@pytest.fixture
async def edge(served):
    spec = load_model_spec(MODEL)
    tokenizer = TextTokenizer(spec.path, 256)
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        yield served, client, tokenizer


async def test_openai_client_matches_sentence_transformers(edge, reference_model) -> None:
    from openai import AsyncOpenAI

    served, _, tokenizer = edge
    oc = AsyncOpenAI(base_url=f"{served.url}/v1", api_key="any", max_retries=0)
    # The official client asks for base64 by default and decodes it.
    got = await oc.embeddings.create(model=MODEL, input=TEXTS)
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    ref = reference_model.encode(TEXTS, normalize_embeddings=True)
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    assert np.abs(vectors - ref).max() < 1e-4
    assert float((vectors * ref).sum(axis=1).min()) >= 0.9999
    expected_tokens = sum(len(s) for s in tokenizer.encode(TEXTS))
    assert got.usage.prompt_tokens == got.usage.total_tokens == expected_tokens
    assert expected_tokens < sum(len(t) for t in TEXTS)  # the long text really was truncated

    floats = await oc.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, ref[0], atol=1e-5)


async def test_dimensions_truncate_and_renormalise(edge, reference_model) -> None:
    _, client, _ = edge
    r = await client.post("/v1/embeddings", json={"input": "hello world", "model": MODEL, "dimensions": 64})
    assert r.status_code == 200
    vec = np.array(r.json()["data"][0]["embedding"])
    ref = reference_model.encode(["hello world"], normalize_embeddings=True)[0][:64]
    assert vec.shape == (64,)
    assert abs(np.linalg.norm(vec) - 1) < 1e-5
    assert np.allclose(vec, ref / np.linalg.norm(ref), atol=1e-5)


async def test_base64_is_little_endian_float32(edge) -> None:
    _, client, _ = edge
    r = await client.post("/v1/embeddings", json={"input": ["x", "y"], "model": MODEL, "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][1]["embedding"])
    vec = np.frombuffer(raw, dtype="<f4")
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-5


async def test_token_id_input(edge, reference_model) -> None:
    _, client, tokenizer = edge
    ids = tokenizer.encode(["hello world"])[0][1:-1].tolist()  # no [CLS]/[SEP]
    r = await client.post("/v1/embeddings", json={"input": [ids], "model": MODEL})
    assert r.status_code == 200
    ref = reference_model.encode(["hello world"], normalize_embeddings=True)[0]
    assert np.allclose(r.json()["data"][0]["embedding"], ref, atol=1e-5)


async def test_gazsi_inference_endpoint(edge, reference_model) -> None:
    _, client, _ = edge
    r = await client.get("/inference", params={"d": "hello world"},
                         headers={"X-Gazsi-Timing": "1", "Cache-Control": "no-cache"})
    body = r.json()
    assert r.status_code == 200
    assert set(body) == {"input", "tokens", "embedding_sample", "inference_time_us", "batch_size"}
    assert body["input"] == "hello world" and body["tokens"] == 4 and body["batch_size"] >= 1
    ref = reference_model.encode(["hello world"], normalize_embeddings=True)[0][:3]
    assert np.allclose(body["embedding_sample"], ref, atol=1e-5)
    assert body["inference_time_us"] > 0
    stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert {"tokenize", "queue", "inference", "serialize", "total"} <= set(stages)


async def test_static_pages_and_unknown_routes(edge) -> None:
    _, client, _ = edge
    for path in ("/index.", "/contacts."):
        r = await client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    r = await client.get("/index.html")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


async def test_models_health_and_metrics(edge) -> None:
    served, client, _ = edge
    models = (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == MODEL
    assert (await client.get("/healthz")).status_code == 200
    ready = (await client.get(served.admin + "/readyz")).json()
    assert ready["engine"]["backend"] == "onnx-cpu"
    def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        families = list(text_string_to_metric_families(text))
        names = [f.name for f in families]
        assert len(names) == len(set(names)), f"families repeated in one scrape: {sorted(names)}"
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    ok = ("gazsi_requests_total", (("route", "/v1/embeddings"), ("status", "200")))
    before = scrape((await client.get(served.admin + "/metrics")).text)
    # Spread over the workers (the fast front's 2 processes): one scrape must count every one of them.
    rs = await asyncio.gather(*(client.post("/v1/embeddings", json={"input": f"count me {i}", "model": MODEL})
                                for i in range(12)))
    assert [r.status_code for r in rs] == [200] * 12
    text = (await client.get(served.admin + "/metrics")).text
    after = scrape(text)
    assert after[ok] - before.get(ok, 0.0) == 12
    assert after[("gazsi_inputs_total", ())] - before.get(("gazsi_inputs_total", ()), 0.0) == 12
    assert after[("gazsi_batch_size_count", ())] > before.get(("gazsi_batch_size_count", ()), 0.0)
    assert "gazsi_batch_size_bucket" in text
    assert 'gazsi_stage_latency_seconds_bucket{le="0.001",stage="inference"}' in text
    assert "gazsi_batch_inference_seconds_bucket" in text
    assert "gazsi_tokens_total" in text


BAD_BODIES = [
    (b"{not json", 400, None),
    (b"\xff\xfe\x00garbage", 400, None),
    (json.dumps({"model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": [], "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": "", "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": ["ok", ""], "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": 5, "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": [1, "a"], "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": [[1, 2], "a"], "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": [[]], "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": [[10**9]], "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": ["x"] * 65, "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": "x" * 5001, "model": MODEL}).encode(), 400, "input"),
    (json.dumps({"input": "x", "model": "gpt-nope"}).encode(), 404, "model"),
    (json.dumps({"input": "x", "model": MODEL, "dimensions": 0}).encode(), 400, "dimensions"),
    (json.dumps({"input": "x", "model": MODEL, "dimensions": 385}).encode(), 400, "dimensions"),
    (json.dumps({"input": "x", "model": MODEL, "encoding_format": "int8"}).encode(), 400, "encoding_format"),
    # A lone surrogate is not Unicode: refused while parsing, and the message says where.
    (b'{"input": "\\ud800 lone surrogate", "model": "all-MiniLM-L6-v2"}', 400, None),
    (json.dumps({"input": "x" * 70_000, "model": MODEL}).encode(), 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
async def test_bad_input_gets_clean_error_and_poisons_nothing(edge, body, status, param) -> None:
    _, client, _ = edge
    r = await client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    assert err["param"] == param
    ok = await client.post("/v1/embeddings", json={"input": "still fine", "model": MODEL})
    assert ok.status_code == 200


async def test_inference_needs_d(edge) -> None:
    _, client, _ = edge
    for params in ({}, {"d": ""}):
        r = await client.get("/inference", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == "d"
