"""The TensorRT engine against sentence-transformers. Skipped wherever ``import tensorrt`` fails,
which is every machine this project has had so far (TensorRT's wheels are on a registry that is
not reachable here), so this test has never run: see edge_node/engines/tensorrt.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="tensorrt is not importable (its wheels are not reachable from here)")
torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: TensorRT needs a GPU", allow_module_level=True)

from edge_node.engines.tensorrt import TensorRTEngine  # noqa: E402
from edge_node.tokenization import TextTokenizer  # noqa: E402
from gazsi_cluster.config import EngineConfig, load_settings  # noqa: E402
from gazsi_cluster.model import load_model_spec  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

TEXTS = ["hello world", "x", "TensorRT builds one plan per GPU model and version. " * 12, "Budapest"]


def test_tensorrt_matches_sentence_transformers_and_caches_plan(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    settings = load_settings()
    spec = load_model_spec(settings.engine.model, settings.engine.model_dir)
    tok = TextTokenizer(spec.path, spec.max_seq_len)
    expected = SentenceTransformer(str(spec.path), device="cuda").encode(TEXTS, normalize_embeddings=True)
    engine = TensorRTEngine(spec, EngineConfig(max_batch_size=64), tmp_path)
    engine.load()
    got = engine.embed_sequences(tok.encode(TEXTS))
    cos = (got * expected).sum(axis=1)
    assert cos.min() >= 0.999, cos
    plans = list((tmp_path / "tensorrt").glob("*.plan"))
    assert len(plans) == 1
    mtime = plans[0].stat().st_mtime_ns
    again = TensorRTEngine(spec, EngineConfig(max_batch_size=64), tmp_path)
    again.load()  # second load reads the cached plan instead of rebuilding
    assert plans[0].stat().st_mtime_ns == mtime
    np.testing.assert_allclose(again.embed_sequences(tok.encode(TEXTS)), got, atol=1e-3)
