"""Per-item embedding cache with in-flight coalescing.

An item's key is ``blake2b(namespace, token ids)`` where the namespace is ``model id + weights
hash``: the token ids after truncation are exactly what the engine sees, so two texts that
tokenise the same share an entry, and new weights never read old vectors.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, generate_latest

from gazsi_cluster.cache._backends import CacheBackend

__all__ = ["CacheResult", "ResponseCache", "item_key"]

T = TypeVar("T")


class _LeaderGone(Exception):
    """The request computing a shared item was cancelled; followers compute it themselves."""


def item_key(namespace: str, seq: np.ndarray) -> str:
    h = hashlib.blake2b(namespace.encode(), digest_size=20)
    h.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass(slots=True)
class CacheResult:
    """What :meth:`ResponseCache.resolve` served. Bill ``computed_tokens``: the tokens this
    request's own ``compute`` ran; the rest came from the cache, from another request's
    in-flight computation, or from an identical input earlier in the same request."""

    vectors: np.ndarray  # (n, D) float32, request order
    status: str  # "hit" | "miss" | "partial"
    computed: Any  # what ``compute`` returned for this request's own misses, or None
    total_tokens: int = 0  # every input's tokens, duplicates included (OpenAI's prompt_tokens)
    computed_tokens: int = 0  # tokens of the distinct inputs this request computed
    computed_items: int = 0  # distinct inputs this request computed
    # Per input, request order: read from the cache; computed by this call (an input's first occurrence
    # among those it ran). A caller that merged several requests' inputs splits status and billing by these.
    hits: list[bool] = field(default_factory=list)
    ran: list[bool] = field(default_factory=list)

    @property
    def cached_tokens(self) -> int:
        """Tokens served without computing them for this request."""
        return self.total_tokens - self.computed_tokens


class ResponseCache:
    def __init__(self, backend: CacheBackend, *, ttl_s: int) -> None:
        self.backend = backend
        self.ttl_s = ttl_s
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.lookups = Counter("gazsi_response_cache_items", "Cache lookups per input item", ["result"],
                               registry=r)
        self.coalesced = Counter("gazsi_response_cache_coalesced", "Items served by another request's "
                                 "in-flight computation", registry=r)
        self._inflight: dict[str, asyncio.Future[np.ndarray]] = {}

    async def close(self) -> None:
        await self.backend.close()

    def status(self) -> dict[str, Any]:
        return {**self.backend.status(), "in_flight": len(self._inflight)}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def resolve(
        self, namespace: str, seqs: Sequence[np.ndarray],
        compute: Callable[[list[np.ndarray]], Awaitable[tuple[np.ndarray, T]]], *, use_cache: bool = True,
    ) -> CacheResult:
        """Vectors for ``seqs``: cached ones read, identical in-flight ones awaited, the rest computed
        with one ``compute(missing) -> (vectors, extra)`` call and stored. ``use_cache=False`` (a
        ``Cache-Control: no-cache`` request) skips reads and coalescing but refreshes the entries."""
        keys = [item_key(namespace, s) for s in seqs]
        unique = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        if use_cache:
            for key, raw in zip(unique, await self.backend.get_many(unique), strict=True):
                if raw is not None:
                    found[key] = np.frombuffer(raw, dtype="<f4")
        hit = [k in found for k in keys]
        hits = sum(hit)
        self.lookups.labels("hit").inc(hits)
        self.lookups.labels("miss").inc(len(keys) - hits)

        first_index = {k: i for i, k in reversed(list(enumerate(keys)))}
        missing = [k for k in unique if k not in found]
        followers = [k for k in missing if use_cache and k in self._inflight]
        leaders = [k for k in missing if k not in followers]
        computed: Any = None
        orphans: list[str] = []
        if leaders:
            computed = await self._lead(leaders, [seqs[first_index[k]] for k in leaders], compute, found,
                                        share=use_cache)
        if followers:
            self.coalesced.inc(len(followers))
            for key in followers:
                try:
                    found[key] = await asyncio.shield(self._inflight[key]) if key in self._inflight else \
                        await self._reread(key)
                except _LeaderGone:
                    orphans.append(key)
            if orphans:
                extra = await self._lead(orphans, [seqs[first_index[k]] for k in orphans], compute, found,
                                         share=False)
                computed = computed if computed is not None else extra
        vectors = np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
        status = "hit" if hits == len(keys) else ("miss" if hits == 0 else "partial")
        ran = leaders + orphans
        ran_at = {first_index[k] for k in ran}
        return CacheResult(
            vectors, status, computed, total_tokens=sum(len(s) for s in seqs),
            computed_tokens=sum(len(seqs[i]) for i in ran_at), computed_items=len(ran),
            hits=hit, ran=[i in ran_at for i in range(len(keys))],
        )

    async def _reread(self, key: str) -> np.ndarray:
        # The leader finished between our lookup and now; its value is in the backend (or was dropped).
        raw = (await self.backend.get_many([key]))[0]
        if raw is None:
            raise _LeaderGone
        return np.frombuffer(raw, dtype="<f4")

    async def _lead(
        self, keys: list[str], seqs: list[np.ndarray],
        compute: Callable[[list[np.ndarray]], Awaitable[tuple[np.ndarray, T]]], found: dict[str, np.ndarray],
        *, share: bool,
    ) -> T:
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[np.ndarray]] = {}
        if share:
            for key in keys:
                fut: asyncio.Future[np.ndarray] = loop.create_future()
                # Followers may all be gone; retrieving the exception keeps asyncio from logging it.
                fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
                futures[key] = self._inflight[key] = fut
        try:
            vectors, extra = await compute(seqs)
            rows = {k: np.asarray(vectors[i], dtype=np.float32) for i, k in enumerate(keys)}
            found.update(rows)
            for key, fut in futures.items():
                fut.set_result(rows[key])
            await self.backend.set_many({k: v.astype("<f4").tobytes() for k, v in rows.items()}, self.ttl_s)
            return extra
        except asyncio.CancelledError:
            for fut in futures.values():
                if not fut.done():
                    fut.set_exception(_LeaderGone())
            raise
        except BaseException as exc:
            for fut in futures.values():
                if not fut.done():
                    fut.set_exception(exc)
            raise
        finally:
            for key, fut in futures.items():
                if self._inflight.get(key) is fut:
                    del self._inflight[key]
