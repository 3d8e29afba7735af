"""``EdgePipeline.handle_inference_many``: a burst of ``/inference`` requests (the GPU plane's) answered request
by request, with one tokenizer call and one embed call per cache policy for all of them.

The embedder here is a recording stand-in whose vector is a function of the token ids, so a burst that
mixed up its requests' vectors fails; the transports that run this over the real ONNX engine are
``tests/integration/edge/test_gpu_reference_plane.py`` and the parity table (``gpu-feeds``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from edge_node.embedders import CachedEmbedder, Embedded, Timing
from edge_node.inputs import InputRules
from edge_node.metrics import RequestMetrics
from edge_node.pipeline import EdgePipeline, GazsiResult, ModelFacts
from edge_node.tokenization import TextTokenizer
from gazsi_cluster.auth import AllowAll, Principal
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.cache import ResponseCache
from gazsi_cluster.cache._backends import LocalLRUBackend
from gazsi_cluster.config import LimitsConfig, load_settings
from gazsi_cluster.errors import Overloaded
from gazsi_cluster.http.wire import HttpReply, HttpRequest
from gazsi_cluster.model import load_model_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MODEL = "all-MiniLM-L6-v2"
DIM = 8


def _vector(seq: np.ndarray) -> np.ndarray:
    v = np.array([float(seq.sum()), float(len(seq)), float(seq[1]), *range(DIM - 3)], dtype=np.float32)
    return v / np.linalg.norm(v)


class _Recording:
    """Vectors from the ids; records each call's inputs; ``fail`` raises it instead; ``gate`` holds the call."""

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def check_ready(self) -> None:
        return None

    async def embed(self, seqs: list[np.ndarray], timing: Timing, *, use_cache: bool = True) -> Embedded:
        self.calls.append([s.tolist() for s in seqs])
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        now = time.perf_counter()
        timing.queued = timing.formed = timing.infer_start = now
        timing.infer_end = now + 1e-4
        return Embedded(np.stack([_vector(s) for s in seqs]), len(seqs), 100)


class _Ledger:
    """Every request allowed; reservations and usage written down (a metered authorizer, unlike AllowAll)."""

    def __init__(self) -> None:
        self.allow = AllowAll()
        self.gate: asyncio.Event | None = None  # holds the second reservation
        self.reserved: list[int] = []
        self.usage: list[tuple[int, int, int, int]] = []  # tokens, reserved, cached, requests

    async def authorize(self, authorization: str | None, *, model: str | None = None, admin: bool = False
                        ) -> Principal:
        return await self.allow.authorize(authorization, model=model, admin=admin)

    async def reserve_tokens(self, principal: Principal, *, model: str, tokens: int) -> None:
        if self.gate is not None and self.reserved:
            await self.gate.wait()
        self.reserved.append(tokens)

    async def record_usage(self, principal: Principal, *, model: str, tokens: int, reserved: int = 0,
                           cached_tokens: int = 0, requests: int = 1) -> None:
        self.usage.append((tokens, reserved, cached_tokens, requests))


def _pipeline(embedder: object, authorizer: object, limits: LimitsConfig | None = None) -> EdgePipeline:
    spec = load_model_spec(MODEL)
    return EdgePipeline(model=ModelFacts(MODEL, DIM, 0),
                        rules=InputRules(TextTokenizer(spec.path, 64), limits or LimitsConfig()),
                        embedder=embedder,  # type: ignore[arg-type]
                        authorizer=authorizer,  # type: ignore[arg-type]
                        metrics=RequestMetrics(), readiness=lambda: {"ready": True})


def _get(key: str | None = None, **headers: str) -> HttpRequest:
    h = dict(headers)
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return HttpRequest("GET", "/inference", "", h, b"", "127.0.0.1", time.perf_counter())


def _error(reply: GazsiResult | HttpReply) -> tuple[int, str | None]:
    assert isinstance(reply, HttpReply), reply
    return reply.status, orjson.loads(reply.body)["error"].get("code")


def _ids(pipeline: EdgePipeline, text: str) -> list[int]:
    ids: list[int] = pipeline.rules.tokenizer.encode([text])[0].tolist()
    return ids


async def test_a_burst_is_answered_request_by_request_with_one_embed_call(tmp_path: Path) -> None:
    authorizer = build_authorizer(load_settings(data_dir=str(tmp_path), auth={"key_env": "test"}))
    await authorizer.start()
    try:
        key = (await authorizer.admin.create(name="burst", rpm=3)).key
        embedder = _Recording()
        pipeline = _pipeline(embedder, authorizer, LimitsConfig(max_input_chars=100))
        texts = ["apple", "", "pear", "a" * 101, "plum", "fig"]
        keys = [key, key, None, key, key, key]
        out = await pipeline.handle_inference_many([_get(k) for k in keys], texts)

        # In order, each its own: the empty d is refused before its key is counted, the missing key is 401,
        # the too-long text spends one of the key's 3 requests, so "fig" finds the limit reached.
        assert out[1].status == 400 and orjson.loads(out[1].body)["error"]["param"] == "d"  # type: ignore[union-attr]
        assert _error(out[2])[0] == 401
        assert _error(out[3])[0] == 400
        assert _error(out[5])[0] == 429 and dict(out[5].headers)["Retry-After"]
        ok = {0: "apple", 4: "plum"}
        for i, text in ok.items():
            result = out[i]
            assert isinstance(result, GazsiResult), result
            ids = _ids(pipeline, text)
            assert result.text == text and result.tokens == len(ids)
            assert np.allclose(result.sample, _vector(np.array(ids))[:3])
        remaining = [dict(out[i].headers)["X-RateLimit-Remaining-Requests"] for i in ok]
        assert remaining == ["2", "0"]
        assert embedder.calls == [[_ids(pipeline, "apple"), _ids(pipeline, "plum")]]  # one call for the burst
        metrics = pipeline.metrics.render().decode()
        assert 'gazsi_requests_total{route="/inference",status="200"} 2.0' in metrics
        assert 'gazsi_requests_total{route="/inference",status="400"} 2.0' in metrics
    finally:
        await authorizer.close()


async def test_cache_status_and_billing_are_per_request_within_a_burst() -> None:
    inner, ledger = _Recording(), _Ledger()
    cached = CachedEmbedder(inner, ResponseCache(LocalLRUBackend(100), ttl_s=60), "ns")
    pipeline = _pipeline(cached, ledger)
    t_apple, t_pear = len(_ids(pipeline, "apple")), len(_ids(pipeline, "pear"))

    first = await pipeline.handle_inference_many(
        [_get(), _get(), _get(**{"cache-control": "no-cache"})], ["apple", "apple", "pear"])
    assert all(isinstance(r, GazsiResult) for r in first)
    assert [dict(r.headers)["X-Gazsi-Cache"] for r in first] == ["miss", "miss", "miss"]
    # The second "apple" rode on the first's computation: counted, not billed.
    assert ledger.usage == [(t_apple, t_apple, 0, 1), (0, t_apple, t_apple, 1), (t_pear, t_pear, 0, 1)]
    assert inner.calls == [[_ids(pipeline, "apple")], [_ids(pipeline, "pear")]]  # one call per cache policy

    ledger.usage.clear()
    second = await pipeline.handle_inference_many([_get(), _get()], ["pear", "apple"])
    assert [dict(r.headers)["X-Gazsi-Cache"] for r in second] == ["hit", "hit"]
    assert ledger.usage == [(0, t_pear, t_pear, 1), (0, t_apple, t_apple, 1)]
    assert len(inner.calls) == 2


async def test_an_embed_failure_answers_every_request_and_gives_back_every_reservation() -> None:
    embedder, ledger = _Recording(), _Ledger()
    embedder.fail = Overloaded("full", retry_after=1.0)
    pipeline = _pipeline(embedder, ledger, LimitsConfig(retry_after_s=4.0))
    out = await pipeline.handle_inference_many([_get(), _get()], ["apple", "pear"])
    assert [_error(r)[0] for r in out] == [429, 429]
    assert all(dict(r.headers)["Retry-After"] == "4" for r in out)
    assert [(u[0], u[3]) for u in ledger.usage] == [(0, 0), (0, 0)]  # nothing billed...
    assert [u[1] for u in ledger.usage] == ledger.reserved  # ...and each reservation given back


async def test_a_cancelled_burst_gives_back_its_reservations() -> None:
    embedder, ledger = _Recording(), _Ledger()
    embedder.gate = asyncio.Event()
    pipeline = _pipeline(embedder, ledger)
    task = asyncio.create_task(pipeline.handle_inference_many([_get(), _get()], ["apple", "pear"]))
    await embedder.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(ledger.reserved) == 2
    assert sorted(u[1] for u in ledger.usage) == sorted(ledger.reserved) and all(u[0] == 0 for u in ledger.usage)


async def test_a_burst_cancelled_between_reservations_gives_back_those_made() -> None:
    embedder, ledger = _Recording(), _Ledger()
    ledger.gate = asyncio.Event()
    pipeline = _pipeline(embedder, ledger)
    task = asyncio.create_task(pipeline.handle_inference_many([_get(), _get()], ["apple", "pear"]))
    for _ in range(100):  # until the second reservation waits
        if ledger.reserved:
            break
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.reserved == [len(_ids(pipeline, "apple"))] and not embedder.calls
    assert ledger.usage == [(0, ledger.reserved[0], 0, 0)]

