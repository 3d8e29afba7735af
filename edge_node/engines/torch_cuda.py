"""PyTorch on CUDA (fp16 by default) with one CUDA graph per (batch bucket, length bucket).

Why graphs: the eager encoder is launch-bound. On an H100 it costs ~4.9 ms per call at batch 1
while the same kernels replayed from a graph cost ~0.30 ms (docs/benchmarks.md). Batches are
padded up to a power-of-two batch bucket and a :data:`SEQ_BUCKETS` length so a few dozen
graphs cover every shape; graphs are captured lazily on first use (``warmup`` captures the
common ones) and share one memory pool, so they cost one set of activations, not one each.

Concurrency: the batcher may call from ``pipeline_depth`` threads. Each thread pads into its
own pinned host buffer without any lock; one lock then orders the enqueue (copy in, replay,
copy out, record an event) on the engine's single stream, and each thread waits for its own
event *after* releasing the lock. Stream order is what keeps graph static buffers safe between
callers, and the next batch's padding and enqueue overlap the running one. Per-thread streams
would let two replays of the same graph race on its static buffers, so there is one stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_node.engines.base import SEQ_BUCKETS, Engine, EngineInfo, bucket_length
from gazsi_cluster.errors import ConfigError, EngineError
from gazsi_cluster.model import ModelSpec

if TYPE_CHECKING:
    import torch

    from gazsi_cluster.config import EngineConfig

__all__ = ["TorchCudaEngine", "batch_bucket", "batch_buckets", "seq_buckets"]

log = logging.getLogger(__name__)

_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself.

    >>> batch_buckets(48)
    [1, 2, 4, 8, 16, 32, 48]
    """
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


def batch_bucket(n: int, max_batch: int) -> int:
    for b in batch_buckets(max_batch):
        if n <= b:
            return b
    return max_batch


def seq_buckets(max_len: int) -> list[int]:
    return sorted({min(b, max_len) for b in SEQ_BUCKETS})


class _Graph:
    __slots__ = ("graph", "static_in", "static_out")

    def __init__(self, graph: Any, static_in: torch.Tensor, static_out: torch.Tensor) -> None:
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out


class _Staging:
    """One thread's pinned host buffers and completion event (reused call after call)."""

    def __init__(self, torch_mod: Any, max_batch: int, max_len: int, dims: int) -> None:
        self.inp = torch_mod.empty(2 * max_batch * max_len, dtype=torch_mod.int64).pin_memory()
        self.inp_np: np.ndarray = self.inp.numpy()
        self.out = torch_mod.empty(max_batch * dims, dtype=torch_mod.float32).pin_memory()
        self.out_np: np.ndarray = self.out.numpy()
        self.event = torch_mod.cuda.Event()


class TorchCudaEngine(Engine):
    """Build without touching CUDA; ``load()`` moves the weights to the GPU.

    >>> engine = TorchCudaEngine(load_model_spec("all-MiniLM-L6-v2"), EngineConfig())  # doctest: +SKIP
    >>> engine.load(); engine.warmup()  # doctest: +SKIP
    >>> engine.embed_sequences([np.array([101, 7592, 102])]).shape  # doctest: +SKIP
    (1, 384)
    """

    def __init__(
        self,
        spec: ModelSpec,
        engine_config: EngineConfig,
        *,
        warmup_batches: Iterable[int] | None = None,
        warmup_seq_lens: Iterable[int] = (16, 32, 64, 128),
        random_weights: bool = False,
    ) -> None:
        self.spec = spec
        self._device_index = engine_config.device
        self._dtype_name = _DTYPES[engine_config.dtype]
        self._use_graphs = engine_config.cuda_graphs
        self._random_weights = random_weights
        max_len = min(engine_config.max_seq_len, spec.max_seq_len, spec.max_position)
        max_batch = engine_config.max_batch_size
        self._batch_buckets = batch_buckets(max_batch)
        self._warmup_batches = sorted(set(
            warmup_batches if warmup_batches is not None else [b for b in self._batch_buckets if b <= 64]
        ))
        self._warmup_lens = sorted({bucket_length(n, max_len) for n in warmup_seq_lens})
        self.info = EngineInfo(
            backend="torch-cuda",
            device=f"cuda:{self._device_index}",
            dtype=self._dtype_name,
            max_batch_size=max_batch,
            max_seq_len=max_len,
            dimensions=spec.dimensions,
            detail={"cuda_graphs": self._use_graphs, "concurrency": "one stream, lock around enqueue only"},
        )
        self._torch: Any = None
        self._model: Any = None
        self._stream: Any = None
        self._pool: Any = None
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._no_graph: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._broken: str | None = None
        self.stats = {"replays": 0, "eager_calls": 0, "captures": 0, "capture_s": 0.0}

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        try:
            import torch
        except ImportError as exc:
            raise ConfigError("the torch-cuda engine needs torch: pip install 'gazsi-cluster[gpu]'") from exc
        from edge_node.engines._torch_bert import BertConfig, MiniBert

        if not torch.cuda.is_available() or torch.cuda.device_count() <= self._device_index:
            raise ConfigError(f"CUDA device {self._device_index} is not available")
        device = torch.device("cuda", self._device_index)
        dtype = getattr(torch, self._dtype_name)
        started = time.perf_counter()
        with torch.cuda.device(device):
            if self._random_weights:
                self._model = MiniBert.random(BertConfig.from_dir(self.spec.path), device=device, dtype=dtype)
            else:
                self._model = MiniBert.from_dir(self.spec.path, device=device, dtype=dtype)
            cuda: Any = torch.cuda  # Stream() is untyped in torch's stubs
            self._stream = cuda.Stream(device)
            self._pool = torch.cuda.graph_pool_handle() if self._use_graphs else None
        self._torch = torch
        gpu = torch.cuda.get_device_name(device)
        self.info = replace(self.info, detail={**self.info.detail, "gpu": gpu, "torch": torch.__version__})
        log.info("torch-cuda engine: %s %s on %s loaded in %.2fs (graphs %s)", self.spec.model_id,
                 self._dtype_name, gpu, time.perf_counter() - started, "on" if self._use_graphs else "off")

    def warmup(self) -> None:
        """Capture the common shapes now so first requests pay no capture cost (~tens of ms each)."""
        started = time.perf_counter()
        batches = [b for b in self._warmup_batches if b <= self.info.max_batch_size] or [1]
        if not self._use_graphs:
            batches = batches[:2]
        for length in self._warmup_lens:
            for batch in batches:
                ids = np.full((batch, length), 101, dtype=np.int64)
                self.embed(ids, np.ones_like(ids))
        log.info("torch-cuda warmup: %d graphs in %.2fs", len(self._graphs), time.perf_counter() - started)

    def healthy(self) -> bool:
        return self._model is not None and self._broken is None

    def close(self) -> None:
        with self._lock:
            if self._torch is not None and self._stream is not None:
                self._stream.synchronize()
            self._graphs.clear()
            self._model = self._stream = self._pool = None
            if self._torch is not None:
                self._torch.cuda.empty_cache()

    # -- embedding -----------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise EngineError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be equal 2-D")
        rows = input_ids.shape[0]
        if rows == 0:
            return np.empty((0, self.info.dimensions), dtype=np.float32)
        step = self.info.max_batch_size
        if rows > step:
            return np.concatenate([self.embed(input_ids[i:i + step], attention_mask[i:i + step])
                                   for i in range(0, rows, step)])
        # Like pad_batch: tokens past max_seq_len are dropped (the tokenizer truncates first anyway).
        width = min(input_ids.shape[1], self.info.max_seq_len)
        staging, packed, bb, length = self._stage(rows, width)
        packed[0, :rows, :width] = input_ids[:, :width]
        packed[1, :rows, :width] = attention_mask[:, :width]
        return self._run(staging, rows, bb, length)

    def embed_sequences(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """Pad straight into this thread's pinned buffer (no intermediate padded arrays)."""
        rows = len(seqs)
        if rows == 0:
            return np.empty((0, self.info.dimensions), dtype=np.float32)
        step = self.info.max_batch_size
        if rows > step:
            return np.concatenate([self.embed_sequences(seqs[i:i + step]) for i in range(0, rows, step)])
        max_len = self.info.max_seq_len
        width = min(max(len(s) for s in seqs), max_len)
        staging, packed, bb, length = self._stage(rows, width)
        for row, seq in enumerate(seqs):
            n = min(len(seq), length)
            packed[0, row, :n] = seq[:n]
            packed[1, row, :n] = 1
        return self._run(staging, rows, bb, length)

    # -- internals -----------------------------------------------------------------------------
    def _stage(self, rows: int, width: int) -> tuple[_Staging, np.ndarray, int, int]:
        """Return this thread's staging buffers and a zeroed ``(2, bucket_b, bucket_len)`` view."""
        if self._model is None:
            raise EngineError("engine not loaded")
        staging: _Staging | None = getattr(self._local, "staging", None)
        if staging is None:
            staging = _Staging(self._torch, self.info.max_batch_size, self.info.max_seq_len, self.info.dimensions)
            self._local.staging = staging
        length = bucket_length(max(width, 1), self.info.max_seq_len)
        bb = batch_bucket(rows, self.info.max_batch_size) if self._use_graphs else rows
        packed = staging.inp_np[: 2 * bb * length].reshape(2, bb, length)
        packed.fill(0)
        # Padding rows attend to one [PAD] position: an all-masked row would give NaN (harmless
        # to other rows, but NaN in a buffer invites confusion when debugging).
        packed[1, rows:, 0] = 1
        return staging, packed, bb, length

    def _run(self, staging: _Staging, rows: int, bb: int, length: int) -> np.ndarray:
        torch = self._torch
        dims = self.info.dimensions
        host_in = staging.inp[: 2 * bb * length].view(2, bb, length)
        host_out = staging.out[: rows * dims].view(rows, dims)
        try:
            with self._lock:
                if self._model is None:
                    raise EngineError("engine closed")
                with torch.cuda.stream(self._stream):
                    graph = self._graph_for(bb, length) if self._use_graphs else None
                    if graph is not None:
                        graph.static_in.copy_(host_in, non_blocking=True)
                        graph.graph.replay()
                        out = graph.static_out
                        self.stats["replays"] += 1
                    else:
                        out = self._model(host_in.to(self._model.device, non_blocking=True))
                        self.stats["eager_calls"] += 1
                    host_out.copy_(out[:rows], non_blocking=True)
                    staging.event.record(self._stream)
            # Waiting outside the lock lets the next caller enqueue behind this batch.
            staging.event.synchronize()
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"CUDA out of memory at batch {bb} x {length}", batch=bb, length=length) from exc
        except RuntimeError as exc:
            # Most CUDA errors are sticky (the context is unusable): report unhealthy.
            self._broken = repr(exc)
            raise EngineError(f"CUDA inference failed: {exc}") from exc
        return staging.out_np[: rows * dims].reshape(rows, dims).copy()

    def _graph_for(self, bb: int, length: int) -> _Graph | None:
        """Return the graph for this shape, capturing it on first use; None = run eagerly. Lock held."""
        key = (bb, length)
        graph = self._graphs.get(key)
        if graph is not None or key in self._no_graph:
            return graph
        torch = self._torch
        started = time.perf_counter()
        try:
            static_in = torch.zeros((2, bb, length), dtype=torch.int64, device=self._model.device)
            static_in[1, :, 0] = 1
            # Warm up on a side stream first (cuBLAS handles, SDPA kernel choice), as the
            # CUDA-graphs docs require, so no one-off allocations end up inside the capture.
            side = torch.cuda.Stream(self._model.device)
            side.wait_stream(self._stream)
            with torch.cuda.stream(side):
                self._model(static_in)
            self._stream.wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a batcher worker waiting on its event, other GPU
            # users in the process) may keep making CUDA calls while this thread captures.
            with torch.cuda.graph(cuda_graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                static_out = self._model(static_in)
            self._stream.wait_stream(side)
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed for batch %d x %d, running it eagerly: %r", bb, length, exc)
            self._no_graph.add(key)
            return None
        graph = _Graph(cuda_graph, static_in, static_out)
        self._graphs[key] = graph
        elapsed = time.perf_counter() - started
        self.stats["captures"] += 1
        self.stats["capture_s"] += elapsed
        log.debug("captured CUDA graph batch %d x %d in %.1f ms", bb, length, elapsed * 1e3)
        return graph

    @property
    def captured_shapes(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)
