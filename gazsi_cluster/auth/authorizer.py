"""The key-store authorizer: bearer key → cached record → validity, scope, limits → Principal.

Hot path with a cached key: parse, one SHA-256, a dict lookup, and the limit buckets (in-process,
or one Redis round trip per bucket). The store is only asked on a cache miss; if it is down a
miss is refused with 503, never allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from gazsi_cluster.auth import Principal
from gazsi_cluster.auth._redis import RedisHealth
from gazsi_cluster.auth.admin import KeyAdmin
from gazsi_cluster.auth.keycache import LocalKeyCache, RedisKeyTier
from gazsi_cluster.auth.keys import KeyRecord, hash_key, parse_bearer
from gazsi_cluster.auth.limits import Decision, LocalRateLimiter, RateLimiter, RedisRateLimiter
from gazsi_cluster.auth.metrics import AuthMetrics
from gazsi_cluster.auth.store import KeyStore
from gazsi_cluster.auth.usage import UsageBuffer, month_start, utc_day
from gazsi_cluster.config import AuthConfig
from gazsi_cluster.errors import AuthenticationError, GazsiError, QuotaExceeded, RateLimited

__all__ = ["KeyAuthorizer"]


def _next_month(day: date) -> date:
    return date(day.year + (day.month == 12), day.month % 12 + 1, 1)


class KeyAuthorizer:
    """Implements :class:`gazsi_cluster.auth.Authorizer` over a :class:`KeyStore` (+ optional Redis)."""

    def __init__(
        self, store: KeyStore, config: AuthConfig, *, redis: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.config, self.clock = store, config, clock
        self.redis: Any = redis
        self.metrics = AuthMetrics()
        # Labelled children bound once: .labels() costs microseconds, and this is the hot path.
        self._hit_local = self.metrics.lookups.labels("local")
        self._ok = self.metrics.decisions.labels("ok")
        self._redis_degraded = self.metrics.degraded.labels("redis")
        self.redis_health = RedisHealth()
        self.local = LocalKeyCache(ttl_s=config.cache_ttl_s, max_size=config.cache_size)
        self.tier = RedisKeyTier(redis, self.redis_health, ttl_s=config.redis_cache_ttl_s) if redis else None
        self.limiter: RateLimiter = (
            RedisRateLimiter(redis, self.redis_health) if redis is not None else LocalRateLimiter()
        )
        self.usage = UsageBuffer(
            store, max_rows=config.usage_buffer_rows, flush_interval_s=config.usage_flush_interval_s,
            on_drop=self.metrics.usage_dropped.inc,
            on_flush=lambda ok: self.metrics.usage_flushes.labels("ok" if ok else "error").inc(),
        )
        self.admin = KeyAdmin(store, env=config.key_env, redis=redis, redis_ttl_s=config.redis_cache_ttl_s,
                              on_revoked=self.evict, clock=clock)
        # Monthly quota: tokens counted at the store when first seen this month, plus what this process
        # (or, with Redis, every process) recorded since.
        self._month_base: dict[str, tuple[date, int]] = {}
        self._month_local: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Records of keys authorised lately, by id: record_usage needs their limits without a lookup.
        self._recent: dict[str, KeyRecord] = {}
        self.db_ok = True
        self.subscribed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.start()
        if self.config.bootstrap_admin_key:
            parse_bearer(f"Bearer {self.config.bootstrap_admin_key}")
            await self.admin.ensure_key(self.config.bootstrap_admin_key, name="bootstrap-admin")
        self._spawn(self.usage.run(), "gazsi-usage-flush")
        if self.tier is not None:
            self._spawn(self.tier.listen(self._on_revoked, self.subscribed), "gazsi-revocations")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task that swallows its cancellation must not hang shutdown.
            await asyncio.wait(tasks, timeout=5)
        await self.usage.flush()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        await self.store.close()

    # -- the seam ------------------------------------------------------------------------
    async def authorize(
        self, authorization: str | None, *, model: str | None = None, admin: bool = False
    ) -> Principal:
        try:
            token = parse_bearer(authorization)
            digest = hash_key(token)
            record = self.local.get(digest)
            if record is None:
                record = await self._lookup(digest)
            else:
                self._hit_local.inc()
            # The lookup was by hash; comparing again in constant time keeps timing flat if a store
            # ever matches loosely (collation, prefix index).
            if not secrets.compare_digest(record.key_hash, digest):
                raise AuthenticationError("Incorrect API key provided.")
            now = self.clock()
            record.check_valid(now)
            record.check_scope(model=model, admin=admin)
            headers = await self._check_limits(record, now)
        except GazsiError as exc:
            self.metrics.decisions.labels(f"{exc.status}").inc()
            raise
        self._ok.inc()
        if self._recent.get(record.id) is not record:
            if len(self._recent) >= self.config.cache_size:
                self._recent.clear()
            self._recent[record.id] = record
        return Principal(record.id, record.name, frozenset(record.scopes), headers)

    async def reserve_tokens(self, principal: Principal, *, model: str, tokens: int) -> None:
        """Take the request's tokens from the key's tokens/minute bucket before it runs.

        A request larger than the key's whole per-minute budget can never fit: it is refused with
        a message saying so instead of an invitation to retry forever.
        """
        record = await self._record_for_usage(principal)
        if record is None or tokens <= 0:
            return
        now = self.clock()
        if record.monthly_quota:
            await self._check_quota(record, now, extra=tokens)
        if record.tpm:
            if tokens > record.tpm:
                raise RateLimited(
                    f"This request needs {tokens} tokens, more than the {record.tpm} tokens per minute "
                    f"key {record.prefix}… may use; split it into smaller requests.",
                    retry_after=60.0, key_id=record.id,
                )
            tok = await self.limiter.acquire(f"tpm:{record.id}", capacity=record.tpm, cost=tokens)
            if not tok.allowed:
                headers: dict[str, str] = {}
                self._headers(headers, "Tokens", tok)
                raise self._limited(f"tokens per minute ({record.tpm})", tok, headers, record)

    async def record_usage(self, principal: Principal, *, model: str, tokens: int, reserved: int = 0) -> None:
        now = self.clock()
        day = utc_day(now)
        self.usage.add(principal.key_id, model, day, tokens=tokens)
        record = await self._record_for_usage(principal)
        if record is None:
            return
        if record.tpm and tokens != reserved:
            # Settle the difference with what was reserved (negative cost = refund).
            await self.limiter.acquire(f"tpm:{record.id}", capacity=record.tpm, cost=tokens - reserved, force=True)
        if record.monthly_quota:
            self._month_local[record.id] = self._month_local.get(record.id, 0) + tokens
            if self.redis is not None and self.redis_health.usable():
                await self._redis_quota_add(record.id, month_start(day), tokens)

    async def _record_for_usage(self, principal: Principal) -> KeyRecord | None:
        return self._recent.get(principal.key_id)

    # -- lookups -------------------------------------------------------------------------
    async def _lookup(self, digest: str) -> KeyRecord:
        record = await self.tier.get(digest) if self.tier is not None else None
        self._set_degraded()
        if record is not None:
            self.metrics.lookups.labels("redis").inc()
        else:
            try:
                record = await self.store.get_by_hash(digest)
            except GazsiError:
                self.db_ok = False
                self.metrics.degraded.labels("database").set(1)
                raise
            self.db_ok = True
            self.metrics.degraded.labels("database").set(0)
            self.metrics.lookups.labels("database").inc()
            if record is None:
                raise AuthenticationError("Incorrect API key provided.")
            if self.tier is not None:
                await self.tier.fill(record)
        self.local.put(record)
        return record

    def evict(self, key_hash: str) -> None:
        self.local.evict(key_hash)

    def _on_revoked(self, key_hash: str) -> None:
        self.metrics.revocations.inc()
        self.evict(key_hash)

    def _set_degraded(self) -> None:
        if self.redis is not None:
            self._redis_degraded.set(1 if self.redis_health.degraded else 0)

    # -- limits --------------------------------------------------------------------------
    async def _check_limits(self, record: KeyRecord, now: float) -> tuple[tuple[str, str], ...]:
        headers: dict[str, str] = {}
        if record.monthly_quota:
            await self._check_quota(record, now)
        # Peek tokens before taking a request slot, so a request refused for tokens costs no slot.
        if record.tpm:
            tok = await self.limiter.acquire(f"tpm:{record.id}", capacity=record.tpm, cost=0)
            self._headers(headers, "Tokens", tok)
            if not tok.allowed:
                raise self._limited(f"tokens per minute ({record.tpm})", tok, headers, record)
        if record.rpm:
            req = await self.limiter.acquire(f"rpm:{record.id}", capacity=record.rpm, cost=1)
            self._headers(headers, "Requests", req)
            if not req.allowed:
                raise self._limited(f"requests per minute ({record.rpm})", req, headers, record)
        self._set_degraded()
        return tuple(headers.items())

    @staticmethod
    def _headers(out: dict[str, str], kind: str, d: Decision) -> None:
        out[f"X-RateLimit-Limit-{kind}"] = str(d.limit)
        out[f"X-RateLimit-Remaining-{kind}"] = str(d.remaining)
        out[f"X-RateLimit-Reset-{kind}"] = f"{d.reset_s:.3f}s"

    def _limited(self, what: str, d: Decision, headers: dict[str, str], record: KeyRecord) -> RateLimited:
        self._set_degraded()
        return RateLimited(
            f"Rate limit reached for {what} on key {record.prefix}…. Retry after {math.ceil(d.retry_after_s)}s.",
            retry_after=max(d.retry_after_s, 0.001), headers=dict(headers), key_id=record.id,
        )

    async def _check_quota(self, record: KeyRecord, now: float, extra: int = 0) -> None:
        assert record.monthly_quota is not None
        month = month_start(utc_day(now))
        used = await self._month_used(record.id, month)
        if used + extra > record.monthly_quota or used >= record.monthly_quota:
            nxt = _next_month(month)
            reset = datetime(nxt.year, nxt.month, 1, tzinfo=UTC).timestamp()
            raise QuotaExceeded(
                f"Monthly token quota of {record.monthly_quota} tokens exhausted for key {record.prefix}…; "
                f"it resets on {nxt.isoformat()}.",
                retry_after=max(1.0, reset - now), key_id=record.id,
            )

    async def _month_used(self, key_id: str, month: date) -> int:
        base = self._month_base.get(key_id)
        if base is None or base[0] != month:
            # Flush first so the store's total includes what this process already served.
            await self.usage.flush()
            total = await self.store.tokens_since(key_id, month)
            base = self._month_base[key_id] = (month, total)
            self._month_local[key_id] = 0
            if self.redis is not None and self.redis_health.usable():
                await self._redis_quota_seed(key_id, month, total)
        if self.redis is not None and self.redis_health.usable():
            shared = await self._redis_quota_get(key_id, month)
            if shared is not None:
                return shared
        return base[1] + self._month_local.get(key_id, 0)

    # Shared monthly counters: seeded once from the store (SET NX), then INCRBY from every process.
    async def _redis_call(self, fn: Callable[[], Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            result = await fn()
        except (RedisError, OSError) as exc:
            self.redis_health.failed(exc)
            return None
        self.redis_health.ok()
        return result

    @staticmethod
    def _quota_key(key_id: str, month: date) -> str:
        return f"gazsi:quota:{key_id}:{month:%Y%m}"

    async def _redis_quota_seed(self, key_id: str, month: date, total: int) -> None:
        await self._redis_call(lambda: self.redis.set(self._quota_key(key_id, month), total, nx=True,
                                                       ex=40 * 86_400))

    async def _redis_quota_get(self, key_id: str, month: date) -> int | None:
        raw = await self._redis_call(lambda: self.redis.get(self._quota_key(key_id, month)))
        return int(raw) if raw is not None else None

    async def _redis_quota_add(self, key_id: str, month: date, tokens: int) -> None:
        await self._redis_call(lambda: self.redis.incrby(self._quota_key(key_id, month), tokens))

    # -- health --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For ``/readyz`` details: auth keeps working while degraded, so this never flips readiness."""
        redis_state = "disabled" if self.redis is None else ("degraded" if self.redis_health.degraded else "ok")
        return {
            "backend": type(self.store).__name__,
            "database": "ok" if self.db_ok else "degraded",
            "redis": redis_state,
            "degraded": (not self.db_ok) or redis_state == "degraded",
            "cached_keys": len(self.local),
            "usage_pending_rows": self.usage.pending(),
        }
