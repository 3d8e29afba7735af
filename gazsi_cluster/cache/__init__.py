"""The response cache (the CDN part): embeddings cached per input item, in Redis or in-process.

>>> cache = build_response_cache(load_settings())  # doctest: +SKIP
"""

from __future__ import annotations

from gazsi_cluster.cache._backends import CacheBackend, LocalLRUBackend, RedisBackend
from gazsi_cluster.cache.embeddings import CacheResult, ResponseCache, item_key
from gazsi_cluster.config import Settings

__all__ = [
    "CacheBackend",
    "CacheResult",
    "LocalLRUBackend",
    "RedisBackend",
    "ResponseCache",
    "build_response_cache",
    "item_key",
]


def build_response_cache(settings: Settings) -> ResponseCache | None:
    """The cache the settings ask for: Redis when ``cache.redis_url`` (or ``auth.redis_url``) is set,
    an in-process LRU otherwise, ``None`` when ``cache.enabled`` is false."""
    cfg = settings.cache
    if not cfg.enabled:
        return None
    url = cfg.redis_url or settings.auth.redis_url
    if url:
        from gazsi_cluster.auth._redis import connect_redis

        return ResponseCache(RedisBackend(connect_redis(url, timeout_s=settings.auth.redis_timeout_s)),
                             ttl_s=cfg.ttl_s)
    return ResponseCache(LocalLRUBackend(cfg.max_items), ttl_s=cfg.ttl_s)
