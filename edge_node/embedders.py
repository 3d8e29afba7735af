"""The embed stage behind one port: token ids in, unit vectors out.

:class:`Embedder` is what the pipeline calls. :class:`BatcherEmbedder` submits to this process's
dynamic batcher (engine in-process); the fast front's workers use
:class:`edge_node.transports.fast.ring_embedder.RingEmbedder`, which hands the ids to the node
process through the shared-memory ring. :class:`CachedEmbedder` puts the response cache in front
of either, so the cache behaves the same on every transport.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_node.batcher import Batcher, ItemResult
from gazsi_cluster.cache import ResponseCache
from gazsi_cluster.errors import DeadlineExceeded

__all__ = ["BatcherEmbedder", "CachedEmbedder", "Embedded", "Embedder", "Timing"]


@dataclass(slots=True)
class Timing:
    """GAZSI-style marks (``time.perf_counter`` seconds): T0 received … serialised."""

    received: float = field(default_factory=time.perf_counter)
    tokenized: float = 0.0
    queued: float = 0.0
    formed: float = 0.0
    infer_start: float = 0.0
    infer_end: float = 0.0
    serialized: float = 0.0

    def stages(self) -> dict[str, float]:
        """Durations in seconds between consecutive marks (stages that did not happen are left out)."""
        out: dict[str, float] = {}
        if self.tokenized:
            out["tokenize"] = self.tokenized - self.received
        if self.formed:
            out["queue"] = self.formed - self.queued
            out["wait_engine"] = self.infer_start - self.formed
            out["inference"] = self.infer_end - self.infer_start
        if self.serialized:
            last = self.infer_end or self.tokenized or self.received
            out["serialize"] = self.serialized - last
            out["total"] = self.serialized - self.received
        return {k: max(0.0, v) for k, v in out.items()}

    def header(self) -> str:
        """``Server-Timing`` syntax, durations in milliseconds."""
        return ", ".join(f"{name};dur={dur * 1000:.3f}" for name, dur in self.stages().items())


@dataclass(slots=True)
class Embedded:
    """One request's vectors and the facts of the batches they rode in."""

    vectors: np.ndarray  # float32 (n, D), rows L2-normalised
    batch_size: int  # largest batch any input rode in (0: none ran, all from the cache)
    inference_us: int  # engine time of the slowest batch involved
    cache: str | None = None  # "hit" | "miss" | "partial" when the response cache took part
    computed_tokens: int | None = None  # tokens this request had computed; None = all of them
    # Per input, when the response cache took part: read from it; computed by this call. Several requests
    # embedded in one call (the GPU plane's bursts) take their cache header and billing from these.
    hits: list[bool] | None = None
    ran: list[bool] | None = None


class Embedder(Protocol):
    def check_ready(self) -> None:
        """Raise :class:`~gazsi_cluster.errors.ServiceUnavailable` while the model cannot serve."""

    async def embed(self, seqs: list[np.ndarray], timing: Timing, *, use_cache: bool = True) -> Embedded:
        """Embed tokenised inputs within the request deadline (``use_cache`` matters to caches only)."""


class BatcherSource(Protocol):
    """Where the batcher lives (:class:`~edge_node.runtime.ModelRuntime`): it exists once the model loaded."""

    batcher: Batcher | None

    def check_ready(self) -> None: ...


class BatcherEmbedder:
    """Inputs through this process's :class:`~edge_node.batcher.Batcher`, bounded by the request deadline."""

    def __init__(self, source: BatcherSource) -> None:
        self.source = source

    def check_ready(self) -> None:
        self.source.check_ready()

    async def embed(self, seqs: list[np.ndarray], timing: Timing, *, use_cache: bool = True) -> Embedded:
        self.source.check_ready()
        batcher = self.source.batcher
        assert batcher is not None  # ready implies loaded
        timing.queued = time.perf_counter()
        futures = batcher.submit(seqs)
        timeout = batcher.config.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                results: list[ItemResult] = await asyncio.gather(*futures)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"no result within the {timeout:g}s request deadline") from exc
        finally:
            # A cancelled handler (client gone) or a failure: drop the inputs still queued.
            for fut in futures:
                if not fut.done():
                    fut.cancel()
        slowest = max(results, key=lambda r: r.batch.infer_end - r.batch.infer_start).batch
        timing.formed = max(r.batch.formed_at for r in results)
        timing.infer_start, timing.infer_end = slowest.infer_start, slowest.infer_end
        vectors = np.stack([r.embedding for r in results]) if len(results) > 1 else results[0].embedding[None, :]
        return Embedded(vectors, max(r.batch.size for r in results),
                        int((slowest.infer_end - slowest.infer_start) * 1e6))


class CachedEmbedder:
    """The response cache in front of another embedder; ``Cache-Control: no-cache`` recomputes.

    Only this request's own misses count as computed (inputs another request is computing right
    now are awaited, not recomputed, and not billed twice).
    """

    def __init__(self, inner: Embedder, cache: ResponseCache, namespace: str) -> None:
        self.inner, self.cache = inner, cache
        # model id + weights hash: new weights never read vectors cached for the old ones.
        self.namespace = namespace

    def check_ready(self) -> None:
        self.inner.check_ready()

    async def embed(self, seqs: list[np.ndarray], timing: Timing, *, use_cache: bool = True) -> Embedded:
        async def compute(missing: list[np.ndarray]) -> tuple[np.ndarray, Embedded]:
            done = await self.inner.embed(missing, timing)
            done.computed_tokens = sum(len(s) for s in missing)
            return done.vectors, done

        result = await self.cache.resolve(self.namespace, seqs, compute, use_cache=use_cache)
        ran: Embedded | None = result.computed
        return Embedded(result.vectors, ran.batch_size if ran else 0, ran.inference_us if ran else 0,
                        cache=result.status, computed_tokens=ran.computed_tokens if ran else 0,
                        hits=result.hits, ran=result.ran)
