"""Export the model to ONNX once and cache the file under the data directory.

The exported graph includes mean pooling and L2 normalisation, so every consumer (ONNX Runtime,
TensorRT) gets finished embeddings. The file name carries the weights hash: a new model never
reuses a stale export. Writing goes through a temporary file and an atomic rename, so two
processes exporting at once cannot leave a torn file.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from gazsi_cluster.errors import ConfigError
from gazsi_cluster.model import ModelSpec

__all__ = ["OPSET", "cached_onnx_path", "ensure_onnx"]

log = logging.getLogger(__name__)

OPSET = 17


def cached_onnx_path(spec: ModelSpec, data_dir: Path) -> Path:
    return Path(data_dir) / "onnx" / f"{spec.model_id}-{spec.weights_hash[:16]}-op{OPSET}.onnx"


def ensure_onnx(spec: ModelSpec, data_dir: Path) -> Path:
    """Return the cached ONNX file for ``spec``, exporting it first if needed (needs torch)."""
    target = cached_onnx_path(spec, data_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        _export(spec, Path(tmp_name))
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    log.info("exported %s to ONNX in %.1fs: %s", spec.model_id, time.perf_counter() - started, target)
    return target


def _export(spec: ModelSpec, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise ConfigError(
            "exporting the model to ONNX needs torch and transformers: pip install 'gazsi-cluster[export]' "
            "(or copy a cached .onnx file into the data directory)"
        ) from exc

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(
                str(spec.path), local_files_only=True, attn_implementation="eager"
            )

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    model = Pooled().eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            str(out),
            input_names=["input_ids", "attention_mask"],
            output_names=["embeddings"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embeddings": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
