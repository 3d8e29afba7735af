"""The encode stage: vectors and counts in, response bodies out (the same bytes on every transport).

``/inference`` writes ``embedding_sample`` as fixed ``%.6f`` (6 decimals), non-finite values as
``null``: orjson writes floats in shortest form, which the GPU data plane's build kernel cannot
reproduce cheaply, so every transport uses this fixed form and the GPU kernel matches it byte for byte.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence

import numpy as np
import orjson

__all__ = ["embeddings_body", "inference_body", "models_body", "sample_json", "shape_vectors"]


def shape_vectors(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Truncate to ``dimensions`` and renormalise (OpenAI's ``dimensions`` semantics)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    shaped: np.ndarray = (cut / np.maximum(norms, 1e-12)).astype(np.float32)
    return shaped


def embeddings_body(vectors: np.ndarray, *, model: str, prompt_tokens: int, encoding_format: str) -> bytes:
    """The ``/v1/embeddings`` body; float rows go through orjson's numpy fast path."""
    if encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()}
            for i, row in enumerate(vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors)]
    return orjson.dumps({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }, option=orjson.OPT_SERIALIZE_NUMPY)


def sample_json(values: Iterable[float]) -> bytes:
    """``[0.123457,-0.000001,…]``: each float32 value widened to double, 6 decimals fixed.

    >>> sample_json([0.5, -0.0, float("nan")])
    b'[0.500000,-0.000000,null]'
    """
    floats = values.tolist() if isinstance(values, np.ndarray) else [float(v) for v in values]
    parts = [b"%.6f" % v if v - v == 0.0 else b"null" for v in floats]
    return b"[" + b",".join(parts) + b"]"


def inference_body(text: str, tokens: int, sample: Iterable[float], inference_us: int, batch_size: int) -> bytes:
    """GAZSI's ``/inference`` body: ``{"input","tokens","embedding_sample","inference_time_us","batch_size"}``."""
    return orjson.dumps({
        "input": text,
        "tokens": tokens,
        "embedding_sample": orjson.Fragment(sample_json(sample)),
        "inference_time_us": inference_us,
        "batch_size": batch_size,
    })


def models_body(model_ids: Sequence[str], created: int) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "gazsi"} for m in model_ids
    ]})
