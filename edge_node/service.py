"""The edge node's request logic, free of HTTP: validate, tokenise, batch, assemble.

Both data planes (FastAPI sockets and the GPU path) and the Serve deployment call this class;
it owns no server and can be tested with a fake engine.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_node.batcher import Batcher, ItemResult
from edge_node.tokenization import TextTokenizer
from gazsi_cluster.cache import ResponseCache
from gazsi_cluster.config import LimitsConfig
from gazsi_cluster.errors import DeadlineExceeded, InputTooLong, InvalidRequest, TooManyInputs, UnknownModel

__all__ = ["EmbedOutcome", "EmbeddingService", "Timing", "normalise_input"]

# Above this many texts, tokenising moves off the event loop (Rust releases the GIL).
_TOKENIZE_INLINE_MAX = 32


@dataclass(slots=True)
class Timing:
    """GAZSI-style marks (``time.perf_counter`` seconds): T0 received … T6 serialised."""

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
class EmbedOutcome:
    vectors: np.ndarray  # float32 (n, D), rows L2-normalised
    prompt_tokens: int
    batch_size: int  # largest batch any input rode in
    inference_us: int  # engine time of the slowest batch involved
    cache: str | None = None  # "hit" | "miss" | "partial" when the response cache took part


def normalise_input(raw: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """Split OpenAI's ``input`` union into texts or token-id lists (exactly one is not None)."""
    if isinstance(raw, str):
        return [raw], None
    if isinstance(raw, list):
        if not raw:
            raise InvalidRequest("input must not be an empty list", param="input")
        if all(isinstance(x, str) for x in raw):
            return list(raw), None
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            return None, [list(raw)]
        if all(isinstance(x, list) for x in raw):
            return None, [list(x) for x in raw]
    raise InvalidRequest(
        "input must be a string, a list of strings, a list of token ids or a list of token-id lists",
        param="input",
    )


class EmbeddingService:
    """Turns inputs into embeddings through the batcher."""

    def __init__(
        self,
        *,
        model_id: str,
        tokenizer: TextTokenizer,
        batcher: Batcher,
        limits: LimitsConfig,
        dimensions: int,
        cache: ResponseCache | None = None,
        cache_namespace: str = "",
    ) -> None:
        self.model_id = model_id
        self.cache = cache
        # model id + weights hash: new weights never read vectors cached for the old ones.
        self.cache_namespace = cache_namespace or model_id
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.limits = limits
        self.dimensions = dimensions

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise UnknownModel(f"The model `{model}` does not exist on this node.", param="model")

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and not 1 <= dimensions <= self.dimensions:
            raise InvalidRequest(
                f"dimensions must be between 1 and {self.dimensions}", param="dimensions"
            )

    def _check_texts(self, texts: Sequence[str]) -> None:
        if len(texts) > self.limits.max_inputs_per_request:
            raise TooManyInputs(
                f"at most {self.limits.max_inputs_per_request} inputs per request, got {len(texts)}",
                param="input",
            )
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"input[{i}] is an empty string", param="input")
            if len(text) > self.limits.max_input_chars:
                raise InputTooLong(
                    f"input[{i}] has {len(text)} characters; the limit is {self.limits.max_input_chars} "
                    "(texts are truncated to the model's token limit, but not beyond this size)",
                    param="input",
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequest(f"input[{i}] is not valid Unicode text", param="input") from exc

    async def tokenize(self, texts: list[str] | None, ids: list[list[int]] | None) -> list[np.ndarray]:
        if texts is not None:
            self._check_texts(texts)
            if len(texts) <= _TOKENIZE_INLINE_MAX:
                return self.tokenizer.encode(texts)
            return await asyncio.to_thread(self.tokenizer.encode, texts)
        assert ids is not None
        if len(ids) > self.limits.max_inputs_per_request:
            raise TooManyInputs(
                f"at most {self.limits.max_inputs_per_request} inputs per request, got {len(ids)}", param="input"
            )
        return self.tokenizer.wrap_ids(ids)

    async def embed_tokens(self, seqs: list[np.ndarray], timing: Timing) -> EmbedOutcome:
        """Run already-tokenised inputs through the batcher, bounded by the request deadline."""
        timing.queued = time.perf_counter()
        futures = self.batcher.submit(seqs)
        timeout = self.batcher.config.request_timeout_s
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
        return EmbedOutcome(
            vectors=vectors,
            prompt_tokens=sum(len(s) for s in seqs),
            batch_size=max(r.batch.size for r in results),
            inference_us=int((slowest.infer_end - slowest.infer_start) * 1e6),
        )

    async def embed(self, raw_input: Any, timing: Timing, *, use_cache: bool = True) -> EmbedOutcome:
        """Embed OpenAI-style input; ``use_cache=False`` (``Cache-Control: no-cache``) recomputes."""
        texts, ids = normalise_input(raw_input)
        seqs = await self.tokenize(texts, ids)
        timing.tokenized = time.perf_counter()
        return await self.embed_cached(seqs, timing, use_cache=use_cache)

    async def embed_cached(self, seqs: list[np.ndarray], timing: Timing, *, use_cache: bool = True) -> EmbedOutcome:
        """Tokenised inputs through the response cache (when configured), the rest through the batcher."""
        if self.cache is None:
            return await self.embed_tokens(seqs, timing)

        async def compute(missing: list[np.ndarray]) -> tuple[np.ndarray, EmbedOutcome]:
            outcome = await self.embed_tokens(missing, timing)
            return outcome.vectors, outcome

        result = await self.cache.resolve(self.cache_namespace, seqs, compute, use_cache=use_cache)
        ran: EmbedOutcome | None = result.computed
        return EmbedOutcome(
            vectors=result.vectors,
            prompt_tokens=sum(len(s) for s in seqs),
            batch_size=ran.batch_size if ran else 0,
            inference_us=ran.inference_us if ran else 0,
            cache=result.status,
        )


def shape_vectors(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Truncate to ``dimensions`` and renormalise (OpenAI's ``dimensions`` semantics)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    shaped: np.ndarray = (cut / np.maximum(norms, 1e-12)).astype(np.float32)
    return shaped


def openai_payload(
    vectors: np.ndarray, *, model: str, prompt_tokens: int, encoding_format: str
) -> dict[str, Any]:
    """The ``/v1/embeddings`` body; float rows stay numpy for orjson's fast path."""
    if encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()}
            for i, row in enumerate(vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors)]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
