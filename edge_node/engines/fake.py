"""A deterministic engine for tests and load-path benchmarks: no model, same contract.

Each embedding is a normalised hash of the input's token ids, so equal inputs give equal
vectors. ``delay_s`` simulates engine time; ``fail_next`` makes the next N calls raise.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np

from edge_node.engines.base import Engine, EngineInfo
from gazsi_cluster.errors import EngineError

__all__ = ["FakeEngine"]


class FakeEngine(Engine):
    def __init__(self, *, dimensions: int = 384, max_batch_size: int = 512, max_seq_len: int = 256,
                 delay_s: float = 0.0) -> None:
        self.info = EngineInfo("fake", "cpu", "float32", max_batch_size, max_seq_len, dimensions)
        self.delay_s = delay_s
        self.fail_next = 0
        self.calls: list[int] = []
        self._lock = threading.Lock()
        self._loaded = False

    def load(self) -> None:
        self._loaded = True

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls.append(int(input_ids.shape[0]))
            failing = self.fail_next > 0
            if failing:
                self.fail_next -= 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if failing:
            raise EngineError("injected engine failure")
        out = np.empty((input_ids.shape[0], self.info.dimensions), dtype=np.float32)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row] == 1]
            seed = int.from_bytes(hashlib.blake2b(ids.astype(np.int64).tobytes(), digest_size=8).digest(), "little")
            vec = np.random.default_rng(seed).standard_normal(self.info.dimensions).astype(np.float32)
            out[row] = vec / np.linalg.norm(vec)
        return out

    def healthy(self) -> bool:
        return self._loaded
