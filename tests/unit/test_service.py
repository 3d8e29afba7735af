from __future__ import annotations

import base64

import numpy as np
import pytest

from edge_node.service import Timing, normalise_input, openai_payload, shape_vectors
from gazsi_cluster.errors import InvalidRequest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "texts", "ids"),
    [
        ("a", ["a"], None),
        (["a", "b"], ["a", "b"], None),
        ([1, 2, 3], None, [[1, 2, 3]]),
        ([[1], [2, 3]], None, [[1], [2, 3]]),
    ],
)
def test_normalise_input(raw, texts, ids) -> None:
    assert normalise_input(raw) == (texts, ids)


@pytest.mark.parametrize("raw", [[], [True, 1], [1, "a"], [["a"], "b"], 3, None, {"a": 1}])
def test_normalise_input_rejects(raw) -> None:
    with pytest.raises(InvalidRequest):
        normalise_input(raw)


def test_shape_vectors_renormalises() -> None:
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32) / 13
    out = shape_vectors(v, 2)
    assert np.allclose(out, [[0.6, 0.8]])
    assert shape_vectors(v, None) is v


def test_base64_payload_round_trips() -> None:
    v = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    p = openai_payload(v, model="m", prompt_tokens=7, encoding_format="base64")
    back = np.frombuffer(base64.b64decode(p["data"][1]["embedding"]), dtype="<f4")
    assert np.array_equal(back, v[1])
    assert p["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_timing_stages_are_ordered_durations() -> None:
    t = Timing(received=1.0, tokenized=1.001, queued=1.002, formed=1.004, infer_start=1.005,
               infer_end=1.010, serialized=1.011)
    stages = t.stages()
    assert stages["inference"] == pytest.approx(0.005)
    assert stages["total"] == pytest.approx(0.011)
    assert "inference;dur=5.000" in t.header()
