"""The hand-written torch encoder behind the CUDA engine, checked on the CPU in fp32.

The GPU engine runs this same code in fp16 under CUDA graphs (tests/gpu/test_cuda_engine.py);
here CI proves the maths (fused QKV, SDPA mask, pooling) against sentence-transformers.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is in the [export] extra")
st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is in the [export] extra")

from edge_node.engines._torch_bert import MiniBert  # noqa: E402
from edge_node.engines.base import pad_batch  # noqa: E402
from edge_node.tokenization import TextTokenizer  # noqa: E402
from gazsi_cluster.model import load_model_spec  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.slow]


def test_minibert_matches_sentence_transformers_on_cpu() -> None:
    spec = load_model_spec("all-MiniLM-L6-v2")
    texts = ["hello world", "x", "The weather in Budapest is mild in spring. " * 20, "GPUs like big batches."]
    reference = st.SentenceTransformer(str(spec.path), device="cpu").encode(texts, normalize_embeddings=True)
    model = MiniBert.from_dir(spec.path, device=torch.device("cpu"), dtype=torch.float32)
    ids, mask = pad_batch(TextTokenizer(spec.path, spec.max_seq_len).encode(texts), spec.max_seq_len)
    ours = model(torch.from_numpy(np.stack([ids, mask]))).numpy()
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5)
