"""Backend choice (TensorRT > CUDA > CPU, explicit choices honoured or refused) without a GPU.

Detection is monkeypatched; constructors of the GPU engines must not touch CUDA or import
torch/tensorrt, which is what lets these run on a CPU-only CI machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import edge_node.engines as engines
from edge_node.engines.tensorrt import Profile, build_profiles, pick_profile, plan_path
from edge_node.engines.torch_cuda import batch_bucket, batch_buckets, seq_buckets
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import ConfigError, EngineError
from gazsi_cluster.model import ModelSpec

pytestmark = pytest.mark.unit


def _spec(tmp_path: Path, weights_hash: str = "ab" * 32) -> ModelSpec:
    return ModelSpec(model_id="all-MiniLM-L6-v2", path=tmp_path, hidden_size=384, num_layers=6, vocab_size=30522,
                     max_position=512, max_seq_len=256, weights_hash=weights_hash)


@pytest.fixture
def detect(monkeypatch: pytest.MonkeyPatch):
    def set_(gpus: int, trt: bool) -> None:
        monkeypatch.setattr(engines, "cuda_device_count", lambda: gpus)
        monkeypatch.setattr(engines, "tensorrt_importable", lambda: trt)

    return set_


@pytest.mark.parametrize(
    ("gpus", "trt", "expected"),
    [(0, False, "onnx-cpu"), (0, True, "onnx-cpu"), (1, False, "torch-cuda"), (2, True, "tensorrt")],
)
def test_auto_prefers_tensorrt_then_cuda_then_cpu(detect, gpus: int, trt: bool, expected: str) -> None:
    detect(gpus, trt)
    backend, reason = engines.choose_backend("auto")
    assert backend == expected
    assert reason  # the log line says why


@pytest.mark.parametrize("requested", ["onnx-cpu", "torch-cuda", "tensorrt", "fake"])
def test_explicit_choice_is_never_swapped(detect, requested: str) -> None:
    detect(4, True)
    assert engines.choose_backend(requested) == (requested, "set in config")


def test_auto_on_gpu_builds_cuda_engine_without_touching_cuda(detect, tmp_path: Path) -> None:
    detect(1, False)
    settings = load_settings(data_dir=tmp_path, engine={"backend": "auto", "max_batch_size": 48})
    engine = engines.create_engine(settings, _spec(tmp_path))
    from edge_node.engines.torch_cuda import TorchCudaEngine

    assert isinstance(engine, TorchCudaEngine)
    assert engine.info.backend == "torch-cuda"
    assert engine.info.max_batch_size == 48
    assert not engine.healthy()  # built, not loaded


def test_auto_with_tensorrt_builds_tensorrt_engine(detect, tmp_path: Path) -> None:
    detect(1, True)
    settings = load_settings(data_dir=tmp_path, engine={"backend": "auto"})
    engine = engines.create_engine(settings, _spec(tmp_path))
    assert engine.info.backend == "tensorrt"


def test_auto_without_gpu_builds_onnx_cpu(detect, tmp_path: Path) -> None:
    detect(0, True)
    settings = load_settings(data_dir=tmp_path, engine={"backend": "auto"})
    assert engines.create_engine(settings, _spec(tmp_path)).info.backend == "onnx-cpu"


def test_explicit_cuda_without_gpu_is_refused(detect, tmp_path: Path) -> None:
    detect(0, False)
    settings = load_settings(data_dir=tmp_path, engine={"backend": "torch-cuda"})
    with pytest.raises(ConfigError, match="no CUDA device"):
        engines.create_engine(settings, _spec(tmp_path))


def test_explicit_tensorrt_without_tensorrt_is_refused(detect, tmp_path: Path) -> None:
    detect(1, False)
    settings = load_settings(data_dir=tmp_path, engine={"backend": "tensorrt"})
    with pytest.raises(ConfigError, match="tensorrt"):
        engines.create_engine(settings, _spec(tmp_path))


def test_cuda_engine_refuses_to_embed_before_load(detect, tmp_path: Path) -> None:
    import numpy as np

    detect(1, False)
    settings = load_settings(data_dir=tmp_path, engine={"backend": "torch-cuda"})
    engine = engines.create_engine(settings, _spec(tmp_path))
    with pytest.raises(EngineError, match="not loaded"):
        engine.embed_sequences([np.array([101, 102])])


# -- shape buckets of the CUDA engine ------------------------------------------------------------
def test_batch_buckets_are_powers_of_two_capped_by_max() -> None:
    assert batch_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert [batch_bucket(n, 512) for n in (1, 2, 3, 8, 9, 300, 512)] == [1, 2, 4, 8, 16, 512, 512]
    assert batch_bucket(33, 48) == 48


def test_seq_buckets_respect_max_len() -> None:
    assert seq_buckets(256)[-1] == 256
    assert seq_buckets(100) == [8, 16, 24, 32, 48, 64, 96, 100]


# -- TensorRT helpers (pure Python; the engine itself needs tensorrt) -------------------------------
def test_plan_path_changes_with_every_key_part(tmp_path: Path) -> None:
    base = {"trt_version": "10.7.0", "gpu_name": "NVIDIA H100 80GB HBM3", "dtype": "float16",
            "max_batch": 512, "max_len": 256}
    first = plan_path(_spec(tmp_path), tmp_path, **base)
    assert first.parent == tmp_path / "tensorrt"
    assert "nvidia-h100-80gb-hbm3" in first.name
    variants = [plan_path(_spec(tmp_path, "cd" * 32), tmp_path, **base)]
    for key, value in [("trt_version", "10.8.0"), ("gpu_name", "NVIDIA L4"), ("dtype", "float32"),
                       ("max_batch", 64), ("max_len", 128)]:
        variants.append(plan_path(_spec(tmp_path), tmp_path, **{**base, key: value}))
    assert len({first, *variants}) == 1 + len(variants)


def test_profiles_cover_every_shape_and_small_batches_get_the_small_profile() -> None:
    profiles = build_profiles(512, 256)
    assert len(profiles) == 2
    assert pick_profile(profiles, 1, 16) == 0
    assert pick_profile(profiles, 16, 256) == 0
    assert pick_profile(profiles, 17, 8) == 1
    assert pick_profile(profiles, 512, 256) == 1
    for p in profiles:
        assert all(lo <= opt <= hi for lo, opt, hi in zip(p.min, p.opt, p.max, strict=True))
    with pytest.raises(EngineError):
        pick_profile(profiles, 513, 16)
    assert build_profiles(8, 128) == [Profile((1, 1), (8, 32), (8, 128))]
