"""The model of one node: engine, tokenizer and (on the in-process transports) the dynamic batcher.

:meth:`ModelRuntime.start` loads the model in a worker thread so the listeners can answer
``/healthz`` (and ``/readyz`` with 503) while it loads; :meth:`stop` drains and frees. The fast
front feeds the same engine through its ring and slot batcher instead of :class:`Batcher`
(``with_batcher=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from edge_node.batcher import Batcher
from edge_node.engines import Engine, create_engine
from edge_node.metrics import EngineMetrics
from edge_node.tokenization import TextTokenizer
from gazsi_cluster.config import BatcherConfig, Settings
from gazsi_cluster.errors import ServiceUnavailable
from gazsi_cluster.model import ModelSpec, load_model_spec

__all__ = ["ModelRuntime"]

log = logging.getLogger(__name__)


class ModelRuntime:
    """Owns the engine; ``state`` is ``loading`` -> ``ready`` (or ``failed``), then ``draining``."""

    def __init__(self, settings: Settings, *, metrics: EngineMetrics, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = engine
        self.spec: ModelSpec = load_model_spec(settings.engine.model, settings.engine.model_dir)
        self.tokenizer: TextTokenizer | None = None
        self.batcher: Batcher | None = None
        self.state = "loading"
        self.load_error: BaseException | None = None
        self.load_seconds = 0.0
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, *, with_batcher: bool) -> None:
        """Begin loading in the background (``wait_loaded`` to block until done)."""
        if self._task is None:
            self._task = asyncio.create_task(self._load(with_batcher), name="gazsi-model-load")

    async def wait_loaded(self) -> None:
        """Return once the model is ready; raise its load error if it failed."""
        await self._loaded.wait()
        if self.load_error is not None:
            raise self.load_error

    async def _load(self, with_batcher: bool) -> None:
        cfg = self.settings.engine
        started = time.perf_counter()
        try:
            engine = self.engine or create_engine(self.settings, self.spec)
            await asyncio.to_thread(engine.load)
            await asyncio.to_thread(engine.warmup)
            self.engine = engine
            max_len = min(cfg.max_seq_len, self.spec.max_seq_len, engine.info.max_seq_len)
            self.tokenizer = TextTokenizer(self.spec.path, max_len)
            if with_batcher:
                self.batcher = Batcher(engine.embed_sequences, self.settings.batcher, max_seq_len=max_len,
                                       observer=self.metrics)
                await self.batcher.start()
            info = engine.info
            self.metrics.engine_info.labels(info.backend, info.device, info.dtype).set(1)
            self.load_seconds = time.perf_counter() - started
            log.info("engine %s ready in %.1fs", info.backend, self.load_seconds)
            self.state = "ready"
        except Exception as exc:
            log.exception("the edge node failed to load its engine")
            self.load_error, self.state = exc, "failed"
        finally:
            self._loaded.set()

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        self.state = "draining" if self.state == "ready" else self.state
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.batcher is not None:
            await self.batcher.stop(drain_timeout_s)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)

    # -- state ---------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int:
        engine_max = self.engine.info.max_seq_len if self.engine is not None else self.spec.max_seq_len
        return min(self.settings.engine.max_seq_len, self.spec.max_seq_len, engine_max)

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "loading":
            raise ServiceUnavailable("the model is still loading", retry_after=5)
        if self.state == "failed":
            raise ServiceUnavailable("the model failed to load on this node", retry_after=30)
        raise ServiceUnavailable("this node is draining", retry_after=1)

    @property
    def healthy(self) -> bool:
        return self.state == "ready" and self.engine is not None and self.engine.healthy()

    def reconfigure(self, batcher: BatcherConfig) -> None:
        self.settings.batcher = batcher
        if self.batcher is not None:
            self.batcher.reconfigure(batcher)

    def readiness(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"model": self.settings.engine.model, "state": self.state}
        engine = self.engine
        if engine is not None:
            detail["engine"] = {"backend": engine.info.backend, "device": engine.info.device,
                                "healthy": engine.healthy()}
            stats = getattr(engine, "stats", None)  # the CUDA-graph engine: replays, eager calls, captures
            if isinstance(stats, dict):
                detail["engine"]["stats"] = dict(stats)
        if self.batcher is not None:
            # The live batching rules, so an operator sees a Serve `user_config` change take effect.
            cfg = self.batcher.config
            detail["batcher"] = {"max_batch_size": cfg.max_batch_size, "max_wait_us": cfg.max_wait_us,
                                 "queue_capacity": cfg.queue_capacity, "running": self.batcher.running}
        if self.load_error is not None:
            detail["error"] = "engine failed to load; see the node's log"
        return detail
