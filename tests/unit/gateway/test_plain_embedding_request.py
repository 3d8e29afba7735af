"""The gateway's quick check of an embeddings body never says yes where the model says no: a body it takes
is valid to pydantic with the same model and dimensions, and everything else goes to the model (issue 14)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from gazsi_cluster.errors import InvalidRequest
from gazsi_cluster.gateway.direct import _embedding_request
from gazsi_cluster.protocol import EmbeddingRequest, plain_embedding_request

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

BODIES: list[Any] = [
    {"model": "m", "input": "x"},
    {"model": "m", "input": ""},
    {"model": "m", "input": "x", "dimensions": 8, "encoding_format": "base64", "user": "u", "extra": [1]},
    {"model": "m", "input": "x", "dimensions": None, "user": None},
    {"model": "m", "input": "x", "dimensions": 0},  # valid to the model; the gateway refuses it after
    {"model": "m", "input": ["a", "b"]},  # valid, but the model's business
    {"model": "m", "input": [1, 2]},
    {"model": "m", "input": 5},
    {"model": "m", "input": None},
    {"model": "m", "input": True},
    {"model": 5, "input": "x"},
    {"input": "x"},
    {"model": "m"},
    {"model": "m", "input": "x", "dimensions": True},
    {"model": "m", "input": "x", "dimensions": 1.0},
    {"model": "m", "input": "x", "dimensions": "8"},
    {"model": "m", "input": "x", "encoding_format": None},
    {"model": "m", "input": "x", "encoding_format": "FLOAT"},
    {"model": "m", "input": "x", "encoding_format": 1},
    {"model": "m", "input": "x", "user": 5},
    ["m", "x"],
    "x",
    None,
]


@pytest.mark.parametrize("data", BODIES, ids=[orjson.dumps(b).decode()[:60] for b in BODIES])
def test_the_quick_check_agrees_with_the_model(data: Any) -> None:
    try:
        req: EmbeddingRequest | None = EmbeddingRequest.model_validate(data)
    except ValidationError:
        req = None
    if plain_embedding_request(data):
        assert req is not None
        assert _embedding_request(orjson.dumps(data)) == (req.model, req.dimensions)
    elif req is None:
        with pytest.raises(InvalidRequest):
            _embedding_request(orjson.dumps(data))
    else:
        assert _embedding_request(orjson.dumps(data)) == (req.model, req.dimensions)


def test_the_common_shape_is_taken_without_the_model() -> None:
    assert plain_embedding_request({"model": "m", "input": "x"})
    assert plain_embedding_request({"model": "m", "input": "x", "dimensions": 8, "encoding_format": "base64"})
