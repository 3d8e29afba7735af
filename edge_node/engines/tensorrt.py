"""TensorRT, built from the same ONNX file as the CPU engine, plan cached on disk.

NOT RUN in this project so far: TensorRT's wheels live on a registry no machine here reaches,
so this module has never been imported with ``tensorrt`` present. It is kept small so a
reviewer can check it against the TensorRT 10 Python API by reading; its tests skip with that
reason. The pure helpers (plan file name, profiles) are unit-tested.

Plan cache: the plan is only valid for one TensorRT version and one GPU model, so both are in
the file name next to the weights hash; a changed model, upgrade or different card builds anew.
Two optimisation profiles: small batches (what the batcher sends at low load, opt 8 x 32) and
the full range (opt at a quarter of max batch x 128), each with its own execution context.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_node.engines.base import Engine, EngineInfo
from edge_node.engines.onnx_export import ensure_onnx
from gazsi_cluster.errors import ConfigError, EngineError
from gazsi_cluster.model import ModelSpec

if TYPE_CHECKING:
    from gazsi_cluster.config import EngineConfig

__all__ = ["Profile", "TensorRTEngine", "build_profiles", "pick_profile", "plan_path"]

log = logging.getLogger(__name__)

_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True, slots=True)
class Profile:
    """min/opt/max (batch, sequence) shapes of one TensorRT optimisation profile."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def covers(self, batch: int, length: int) -> bool:
        return self.min[0] <= batch <= self.max[0] and self.min[1] <= length <= self.max[1]


def build_profiles(max_batch: int, max_len: int) -> list[Profile]:
    small = min(16, max_batch)
    profiles = [Profile((1, 1), (min(8, small), min(32, max_len)), (small, max_len))]
    if max_batch > small:
        profiles.append(Profile((1, 1), (max(small, max_batch // 4), min(128, max_len)), (max_batch, max_len)))
    return profiles


def pick_profile(profiles: list[Profile], batch: int, length: int) -> int:
    """Index of the first (tightest) profile that covers the shape."""
    for i, profile in enumerate(profiles):
        if profile.covers(batch, length):
            return i
    raise EngineError(f"no TensorRT profile covers batch {batch} x {length}", batch=batch, length=length)


def plan_path(spec: ModelSpec, data_dir: Path, *, trt_version: str, gpu_name: str, dtype: str,
              max_batch: int, max_len: int) -> Path:
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    name = f"{spec.model_id}-{spec.weights_hash[:16]}-trt{trt_version}-{gpu}-{dtype}-b{max_batch}-s{max_len}.plan"
    return Path(data_dir) / "tensorrt" / name


class TensorRTEngine(Engine):
    """Build without importing TensorRT; ``load()`` builds or reads the cached plan."""

    def __init__(self, spec: ModelSpec, engine_config: EngineConfig, data_dir: Path) -> None:
        self.spec = spec
        self._data_dir = Path(data_dir)
        self._device_index = engine_config.device
        max_len = min(engine_config.max_seq_len, spec.max_seq_len)
        self._profiles = build_profiles(engine_config.max_batch_size, max_len)
        self.info = EngineInfo(
            backend="tensorrt",
            device=f"cuda:{engine_config.device}",
            dtype=engine_config.dtype,
            max_batch_size=engine_config.max_batch_size,
            max_seq_len=max_len,
            dimensions=spec.dimensions,
        )
        self._torch: Any = None
        self._engine: Any = None
        self._contexts: list[Any] = []
        self._dtypes: dict[str, Any] = {}
        self._output = "embeddings"
        self._stream: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise ConfigError("the tensorrt engine needs tensorrt and torch: pip install 'gazsi-cluster[tensorrt,gpu]'") from exc
        device = torch.device("cuda", self._device_index)
        gpu = torch.cuda.get_device_name(device)
        path = plan_path(self.spec, self._data_dir, trt_version=trt.__version__, gpu_name=gpu,
                         dtype=self.info.dtype, max_batch=self.info.max_batch_size, max_len=self.info.max_seq_len)
        logger = trt.Logger(trt.Logger.WARNING)
        if not path.is_file():
            self._build(trt, logger, path)
        with torch.cuda.device(device):
            engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"TensorRT could not deserialise {path}; delete it to rebuild")
            cuda: Any = torch.cuda  # Stream() is untyped in torch's stubs
            self._stream = cuda.Stream(device)
            self._contexts = []
            for index in range(len(self._profiles)):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(index, self._stream.cuda_stream)
                self._contexts.append(ctx)
        torch_dtypes = {trt.int64: torch.int64, trt.int32: torch.int32, trt.float32: torch.float32,
                        trt.float16: torch.float16}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            self._dtypes[name] = torch_dtypes[engine.get_tensor_dtype(name)]
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                self._output = name
        self._engine, self._torch = engine, torch
        self.info = replace(self.info, detail={"gpu": gpu, "tensorrt": trt.__version__, "plan": str(path)})
        log.info("TensorRT %s engine loaded from %s", trt.__version__, path)

    def _build(self, trt: Any, logger: Any, path: Path) -> None:
        onnx_path = ensure_onnx(self.spec, self._data_dir)
        started = time.perf_counter()
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
        if self.info.dtype == "float16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.info.dtype == "bfloat16":
            config.set_flag(trt.BuilderFlag.BF16)
        for p in self._profiles:
            profile = builder.create_optimization_profile()
            for name in _INPUTS:
                profile.set_shape(name, p.min, p.opt, p.max)
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError("TensorRT failed to build the engine (see its log above)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".plan.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(memoryview(plan))
            os.replace(tmp, path)  # atomic: a concurrent builder never sees a torn plan
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("built TensorRT plan in %.1fs: %s", time.perf_counter() - started, path)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self._engine is None:
            raise EngineError("engine not loaded")
        rows = input_ids.shape[0]
        step = self.info.max_batch_size
        if rows > step:
            return np.concatenate([self.embed(input_ids[i:i + step], attention_mask[i:i + step])
                                   for i in range(0, rows, step)])
        width = min(input_ids.shape[1], self.info.max_seq_len)
        torch = self._torch
        device = torch.device("cuda", self._device_index)
        with self._lock, torch.cuda.stream(self._stream):
            ctx = self._contexts[pick_profile(self._profiles, rows, width)]
            tensors = {
                name: torch.from_numpy(np.ascontiguousarray(arr[:, :width])).to(device, self._dtypes[name])
                for name, arr in zip(_INPUTS, (input_ids, attention_mask), strict=True)
            }
            out = torch.empty((rows, self.info.dimensions), dtype=self._dtypes[self._output], device=device)
            for name, tensor in tensors.items():
                ctx.set_input_shape(name, tuple(tensor.shape))
                ctx.set_tensor_address(name, tensor.data_ptr())
            ctx.set_tensor_address(self._output, out.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
            result: np.ndarray = out.float().cpu().numpy()  # .cpu() waits for the stream
        return result

    def healthy(self) -> bool:
        return self._engine is not None

    def close(self) -> None:
        with self._lock:
            self._contexts, self._engine = [], None
