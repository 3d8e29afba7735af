"""Everything one edge node runs, owned in one place: engine, tokenizer, batcher, service, metrics.

``EdgeRuntime.start`` loads the model in a worker thread so the HTTP server can answer
``/healthz`` (and ``/readyz`` with 503) while the model loads; ``stop`` drains and frees.
Both data planes and the Serve deployment wrap this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from edge_node.batcher import Batcher
from edge_node.engines import Engine, create_engine
from edge_node.metrics import EdgeMetrics
from edge_node.service import EmbeddingService
from edge_node.tokenization import TextTokenizer
from gazsi_cluster.auth import AllowAll, Authorizer
from gazsi_cluster.cache import ResponseCache, build_response_cache
from gazsi_cluster.config import BatcherConfig, Settings
from gazsi_cluster.errors import ServiceUnavailable
from gazsi_cluster.model import ModelSpec, load_model_spec

__all__ = ["EdgeRuntime"]

log = logging.getLogger(__name__)


class EdgeRuntime:
    def __init__(
        self, settings: Settings, *, engine: Engine | None = None, authorizer: Authorizer | None = None
    ) -> None:
        self.settings = settings
        self.metrics = EdgeMetrics()
        self.authorizer: Authorizer = authorizer or AllowAll()
        self.response_cache: ResponseCache | None = build_response_cache(settings)
        self._auth_started = False
        self.created = int(time.time())
        self._engine = engine
        self._service: EmbeddingService | None = None
        self._spec: ModelSpec | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.load_error: BaseException | None = None
        self.draining = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, *, wait: bool = False) -> None:
        """Begin loading; with ``wait`` return only once ready (or raise the load error)."""
        if not self._auth_started:
            # The key store connects (and migrates) before the first request can need it.
            start = getattr(self.authorizer, "start", None)
            if start is not None:
                await start()
            self._auth_started = True
        if self._load_task is None:
            self._load_task = asyncio.create_task(self._load(), name="gazsi-edge-load")
        if wait:
            await asyncio.shield(self._load_task)
            if self.load_error is not None:
                raise self.load_error

    async def _load(self) -> None:
        try:
            cfg = self.settings.engine
            spec = await asyncio.to_thread(load_model_spec, cfg.model, cfg.model_dir)
            engine = self._engine or create_engine(self.settings, spec)
            started = time.perf_counter()
            await asyncio.to_thread(engine.load)
            await asyncio.to_thread(engine.warmup)
            log.info("engine %s ready in %.1fs", engine.info.backend, time.perf_counter() - started)
            tokenizer = TextTokenizer(spec.path, min(cfg.max_seq_len, spec.max_seq_len, engine.info.max_seq_len))
            batcher = Batcher(
                engine.embed_sequences, self.settings.batcher, max_seq_len=tokenizer.max_seq_len,
                observer=self.metrics,
            )
            await batcher.start()
            self._engine, self._spec = engine, spec
            self._service = EmbeddingService(
                model_id=cfg.model, tokenizer=tokenizer, batcher=batcher, limits=self.settings.limits,
                dimensions=engine.info.dimensions, cache=self.response_cache,
                cache_namespace=f"{cfg.model}:{spec.weights_hash}",
            )
            info = engine.info
            self.metrics.engine_info.labels(info.backend, info.device, info.dtype).set(1)
        except Exception as exc:
            log.exception("edge node failed to load its engine")
            self.load_error = exc

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        self.draining = True
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        if self._service is not None:
            await self._service.batcher.stop(drain_timeout_s)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
        if self._auth_started:
            close = getattr(self.authorizer, "close", None)
            if close is not None:
                await close()
            self._auth_started = False
        if self.response_cache is not None:
            await self.response_cache.close()

    # -- state ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._service is not None and self._service.batcher.running and not self.draining

    @property
    def service(self) -> EmbeddingService:
        if self._service is None:
            if self.load_error is not None:
                raise ServiceUnavailable("the model failed to load on this node", retry_after=30)
            raise ServiceUnavailable("the model is still loading", retry_after=5)
        if self.draining:
            raise ServiceUnavailable("this node is draining", retry_after=1)
        return self._service

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def spec(self) -> ModelSpec | None:
        return self._spec

    def reconfigure(self, batcher: BatcherConfig) -> None:
        self.settings.batcher = batcher
        if self._service is not None:
            self._service.batcher.reconfigure(batcher)

    def readiness(self) -> dict[str, Any]:
        engine = self._engine
        detail: dict[str, Any] = {
            "ready": self.ready,
            "model_loaded": self._service is not None,
            "batcher_running": self._service is not None and self._service.batcher.running,
            "draining": self.draining,
        }
        if engine is not None:
            detail["engine"] = {"backend": engine.info.backend, "device": engine.info.device,
                                "healthy": engine.healthy()}
        if self._service is not None:
            # The live batching rules, so an operator can see a `user_config` change take effect.
            cfg = self._service.batcher.config
            detail["batcher"] = {"max_batch_size": cfg.max_batch_size, "max_wait_us": cfg.max_wait_us,
                                 "queue_capacity": cfg.queue_capacity}
        if self.load_error is not None:
            detail["error"] = "engine failed to load; see the node's log"
        auth_status = getattr(self.authorizer, "status", None)
        if auth_status is not None:
            detail["auth"] = auth_status()
        if self.response_cache is not None:
            detail["cache"] = self.response_cache.status()
        return detail
