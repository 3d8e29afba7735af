"""The GAZSI ``/inference`` JSON body, byte-identical on the socket and GPU data planes.

orjson writes floats in shortest form, which a GPU kernel cannot reproduce cheaply; both paths
therefore write ``embedding_sample`` as fixed ``%.6f`` (6 decimals, as the old ``round(x, 6)``),
non-finite values as ``null``. Key order and string escaping are orjson's.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

__all__ = ["inference_body", "sample_json"]


def sample_json(values: Sequence[float]) -> bytes:
    """``[0.123457,-0.000001,…]``: each float32 value widened to double, 6 decimals fixed.

    >>> sample_json([0.5, -0.0, float("nan")])
    b'[0.500000,-0.000000,null]'
    """
    parts = [b"%.6f" % float(v) if float(v) - float(v) == 0.0 else b"null" for v in values]
    return b"[" + b",".join(parts) + b"]"


def inference_body(text: str, tokens: int, sample: Sequence[float], inference_us: int, batch_size: int) -> bytes:
    """The whole body: ``{"input","tokens","embedding_sample","inference_time_us","batch_size"}``."""
    return orjson.dumps({
        "input": text,
        "tokens": tokens,
        "embedding_sample": orjson.Fragment(sample_json(sample)),
        "inference_time_us": inference_us,
        "batch_size": batch_size,
    })
