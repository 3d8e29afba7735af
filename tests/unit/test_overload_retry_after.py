"""``limits.retry_after_s`` is the Retry-After of a full queue, on every embedder and after reconfigure.

The setting was declared but read by nothing (issue 13): each embedder hard-coded 1 s. The pipeline
now stamps the configured value on the embedder's ``Overloaded``, so this drives the pipeline with an
embedder that is always full and reads the header.
"""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest

from edge_node.embedders import Embedded, Timing
from edge_node.inputs import InputRules
from edge_node.metrics import RequestMetrics
from edge_node.pipeline import EdgePipeline, ModelFacts
from edge_node.tokenization import TextTokenizer
from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import LimitsConfig
from gazsi_cluster.errors import Overloaded
from gazsi_cluster.http.wire import HttpRequest
from gazsi_cluster.model import load_model_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

MODEL = "all-MiniLM-L6-v2"


class _Full:
    """An embedder whose queue is always full, with its own (hard-coded) guess of a retry."""

    def check_ready(self) -> None:
        return None

    async def embed(self, seqs: list[np.ndarray], timing: Timing, *, use_cache: bool = True) -> Embedded:
        raise Overloaded("The edge node is at capacity; retry shortly.", retry_after=1.0, queued=1, limit=1)


def _pipeline(limits: LimitsConfig) -> EdgePipeline:
    spec = load_model_spec(MODEL)
    return EdgePipeline(model=ModelFacts(MODEL, spec.dimensions, 0),
                        rules=InputRules(TextTokenizer(spec.path, 64), limits), embedder=_Full(),
                        authorizer=AllowAll(), metrics=RequestMetrics(), readiness=lambda: {"ready": True})


def _request() -> HttpRequest:
    body = orjson.dumps({"input": "hello", "model": MODEL})
    return HttpRequest("POST", "/v1/embeddings", "", {"content-type": "application/json"}, body, "127.0.0.1",
                       time.perf_counter())


async def test_full_queue_answers_with_the_configured_retry_after() -> None:
    pipeline = _pipeline(LimitsConfig(retry_after_s=7.0))
    reply = await pipeline.handle(_request())
    assert reply.status == 429
    assert dict(reply.headers)["Retry-After"] == "7"

    # Serve reconfigure replaces the limits object: the next refusal says the new value.
    pipeline.rules.limits = LimitsConfig(retry_after_s=3.0)
    reply = await pipeline.handle(_request())
    assert reply.status == 429 and dict(reply.headers)["Retry-After"] == "3"


async def test_default_retry_after_is_unchanged() -> None:
    reply = await _pipeline(LimitsConfig()).handle(_request())
    assert reply.status == 429 and dict(reply.headers)["Retry-After"] == "1"
