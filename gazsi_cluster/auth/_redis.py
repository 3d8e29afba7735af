"""Shared Redis plumbing: client construction and a small breaker that marks Redis degraded.

After a failure every caller skips Redis for ``cooldown_s`` (falling back to the database or
in-process state) instead of paying a socket timeout per request; the next call after the
cooldown probes Redis again.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["RedisHealth", "connect_redis"]


def connect_redis(url: str, *, timeout_s: float = 0.5) -> Any:
    """A ``redis.asyncio.Redis`` client with short timeouts (the hot path must not hang on Redis)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False,
    )


class RedisHealth:
    def __init__(self, *, cooldown_s: float = 1.0) -> None:
        self.cooldown_s = cooldown_s
        self.degraded = False
        self.last_error: str | None = None
        self._skip_until = 0.0

    def usable(self) -> bool:
        return not self.degraded or time.monotonic() >= self._skip_until

    def failed(self, exc: BaseException) -> None:
        self.degraded = True
        self.last_error = type(exc).__name__
        self._skip_until = time.monotonic() + self.cooldown_s

    def ok(self) -> None:
        if self.degraded:
            self.degraded = False
            self.last_error = None
