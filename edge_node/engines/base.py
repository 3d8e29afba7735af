"""The narrow engine contract every backend implements.

An engine takes a padded batch (``input_ids`` and ``attention_mask``, int64, shape (B, L)) and
returns pooled, L2-normalised embeddings (float32, shape (B, D)). Mean pooling and
normalisation live inside the engine so the GPU backends do them on the device.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SEQ_BUCKETS", "Engine", "EngineInfo", "bucket_length", "pad_batch"]

# Padded lengths a batch is rounded up to: few shapes keep CUDA graphs and TensorRT profiles
# reusable while wasting at most ~half a bucket of padding.
SEQ_BUCKETS: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_length(n: int, max_len: int) -> int:
    for b in SEQ_BUCKETS:
        if n <= b:
            return min(b, max_len)
    return max_len


def pad_batch(seqs: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token arrays to a shared bucket length; returns (input_ids, attention_mask)."""
    longest = max(len(s) for s in seqs)
    length = bucket_length(longest, max_len)
    ids = np.zeros((len(seqs), length), dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for row, seq in enumerate(seqs):
        n = min(len(seq), length)
        ids[row, :n] = seq[:n]
        mask[row, :n] = 1
    return ids, mask


@dataclass(frozen=True, slots=True)
class EngineInfo:
    backend: str
    device: str
    dtype: str
    max_batch_size: int
    max_seq_len: int
    dimensions: int
    detail: dict[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """Load once, warm up, then ``embed`` from one or more worker threads."""

    info: EngineInfo

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and allocate device memory."""

    def warmup(self) -> None:
        """Run representative shapes so the first request pays no compile/capture cost."""
        for batch in (1, min(8, self.info.max_batch_size)):
            ids = np.full((batch, 16), 101, dtype=np.int64)
            self.embed(ids, np.ones_like(ids))

    @abc.abstractmethod
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embed a padded batch; returns float32 (B, D), each row L2-normalised."""

    def embed_sequences(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """Pad unpadded token arrays to a bucket and embed them (the batcher's entry point).

        GPU engines override this to pad straight into their static buffers.
        """
        ids, mask = pad_batch(seqs, self.info.max_seq_len)
        return self.embed(ids, mask)

    def healthy(self) -> bool:
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory; default: nothing to do."""
