"""Inference engines and the choice among them.

``auto`` picks TensorRT when it imports and a GPU is present, else PyTorch CUDA with CUDA
graphs, else ONNX Runtime on the CPU, and logs why. Backends import their heavy libraries
only when chosen.
"""

from __future__ import annotations

import logging

from edge_node.engines.base import SEQ_BUCKETS, Engine, EngineInfo, bucket_length, pad_batch
from edge_node.hardware import cuda_device_count, tensorrt_importable
from gazsi_cluster.config import Settings
from gazsi_cluster.errors import ConfigError
from gazsi_cluster.model import ModelSpec

__all__ = [
    "SEQ_BUCKETS",
    "Engine",
    "EngineInfo",
    "bucket_length",
    "choose_backend",
    "create_engine",
    "pad_batch",
]

log = logging.getLogger(__name__)


def choose_backend(requested: str) -> tuple[str, str]:
    """Return (backend, reason). Explicit choices are honoured or refused, never swapped."""
    if requested != "auto":
        return requested, "set in config"
    gpus = cuda_device_count()
    if gpus and tensorrt_importable():
        return "tensorrt", f"tensorrt imports and {gpus} CUDA device(s) found"
    if gpus:
        return "torch-cuda", f"{gpus} CUDA device(s) found; tensorrt not importable"
    return "onnx-cpu", "no CUDA device found"


def create_engine(settings: Settings, spec: ModelSpec) -> Engine:
    """Build (not load) the engine the settings ask for."""
    backend, reason = choose_backend(settings.engine.backend)
    log.info("engine backend %s (%s)", backend, reason)
    cfg = settings.engine
    if backend == "onnx-cpu":
        from edge_node.engines.onnx_cpu import OnnxCpuEngine

        return OnnxCpuEngine(
            spec, settings.data_dir, max_seq_len=cfg.max_seq_len, max_batch_size=cfg.max_batch_size,
            threads=cfg.onnx_threads, spin=cfg.onnx_spin,
        )
    if backend == "torch-cuda":
        if not cuda_device_count():
            raise ConfigError("engine.backend=torch-cuda but no CUDA device is available")
        from edge_node.engines.torch_cuda import TorchCudaEngine

        return TorchCudaEngine(spec, cfg)
    if backend == "tensorrt":
        if not tensorrt_importable():
            raise ConfigError("engine.backend=tensorrt but `import tensorrt` fails: pip install 'gazsi-cluster[tensorrt]'")
        from edge_node.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(spec, cfg, settings.data_dir)
    if backend == "fake":
        from edge_node.engines.fake import FakeEngine

        return FakeEngine(dimensions=spec.dimensions, max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len)
    raise ConfigError(f"unknown engine backend {backend!r}")
