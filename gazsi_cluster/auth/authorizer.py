"""The key-store authorizer: bearer key → cached record → validity, scope, limits → Principal.

Hot path with a cached key: parse, one SHA-256, a dict lookup, and the limit buckets (in-process,
in the node's shared-memory table, or one Redis round trip per bucket). The store is only asked
on a cache miss; if it is down a miss is refused with 503, never allowed.

Every process of a node builds its own ``KeyAuthorizer``; what they share is injected: Redis
(cluster-wide buckets, budgets, key tier, change messages) and the node's
:class:`~gazsi_cluster.auth.shared_limits.SharedBuckets` (node-wide buckets and budgets, and
the fallback while Redis is down). Limits are keyed by the key's id, which rotation keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gazsi_cluster.auth import Principal
from gazsi_cluster.auth._redis import RedisHealth
from gazsi_cluster.auth.admin import KeyAdmin
from gazsi_cluster.auth.keycache import KeyEventWatcher, LocalKeyCache, RedisKeyTier, parse_change
from gazsi_cluster.auth.keys import KeyRecord, format_utc, hash_key, parse_bearer
from gazsi_cluster.auth.limits import (
    Decision,
    LocalRateLimiter,
    Op,
    Outcome,
    RateLimiter,
    RedisRateLimiter,
    decide,
    limit_name,
)
from gazsi_cluster.auth.metrics import AuthMetrics
from gazsi_cluster.auth.quotas import Period, QuotaBook, periods
from gazsi_cluster.auth.store import KeyEvent, KeyStore
from gazsi_cluster.auth.usage import UsageBuffer, utc_day
from gazsi_cluster.auth.usage_journal import UsageJournal
from gazsi_cluster.config import AuthConfig
from gazsi_cluster.errors import AuthenticationError, GazsiError, KeyRevoked, RateLimited, ServiceUnavailable

__all__ = ["KeyAuthorizer"]


class KeyAuthorizer:
    """Implements :class:`gazsi_cluster.auth.Authorizer` over a :class:`KeyStore` (+ optional Redis).

    ``limiter``: the node's shared buckets (``SharedBuckets``) when several processes serve one
    node; it also holds the budget counters. ``journal_dir``: where this process's usage journal
    goes (None = no journal: buffered usage is lost if the process dies before a flush).
    """

    def __init__(
        self, store: KeyStore, config: AuthConfig, *, redis: Any | None = None,
        limiter: RateLimiter | None = None, journal_dir: Path | None = None,
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
        self.node_limiter: RateLimiter = limiter if limiter is not None else LocalRateLimiter()
        self.limiter: RateLimiter = self.node_limiter
        if redis is not None:
            self.limiter = RedisRateLimiter(redis, self.redis_health, fallback=self.node_limiter)
        self.usage = UsageBuffer(
            store, max_rows=config.usage_buffer_rows, flush_interval_s=config.usage_flush_interval_s,
            on_drop=self.metrics.usage_dropped.inc,
            on_flush=lambda ok: self.metrics.usage_flushes.labels("ok" if ok else "error").inc(),
            journal=UsageJournal(journal_dir) if journal_dir is not None else None,
        )
        self.quotas = QuotaBook(store, self.limiter, before_seed=self.usage.flush, refresh_s=config.quota_refresh_s)
        self.admin = KeyAdmin(store, env=config.key_env, redis=redis, redis_ttl_s=config.redis_cache_ttl_s,
                              on_change=self._on_change, clock=clock, journal_dir=journal_dir)
        self.watcher = (
            KeyEventWatcher(store, self._apply_event, interval_s=config.key_events_poll_s)
            if config.key_events_poll_s > 0 else None
        )
        self._tasks: set[asyncio.Task[None]] = set()
        # Records of keys authorised lately, by id: reserve/record_usage need their limits.
        self._recent: dict[str, KeyRecord] = {}
        self.db_ok = True
        self.subscribed = asyncio.Event()
        self.watching = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.start()
        if self.config.bootstrap_admin_key:
            parse_bearer(f"Bearer {self.config.bootstrap_admin_key}")
            await self.admin.ensure_key(self.config.bootstrap_admin_key, name="bootstrap-admin")
        self.usage.open()
        self._spawn(self.usage.run(), "gazsi-usage-flush")
        if self.tier is not None:
            self._spawn(self.tier.listen(self._on_message, self.subscribed), "gazsi-revocations")
        if self.watcher is not None:
            self._spawn(self.watcher.run(self.watching), "gazsi-key-events")

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
        self.usage.close()
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
        """Take the request's tokens from the key's tokens/minute bucket and budgets before it runs.

        A request larger than the key's whole per-minute limit can never fit: it is refused with
        a message saying so instead of an invitation to retry forever. All or nothing, in one
        step (one Redis round trip): when one limit refuses, none is charged.
        """
        record = await self._record_for(principal)
        if record is None or tokens <= 0:
            return
        now = self.clock()
        ops: list[Op] = []
        if record.tpm:
            if tokens > record.tpm:
                raise RateLimited(
                    f"This request needs {tokens} tokens, more than the {record.tpm} tokens per minute "
                    f"key {record.prefix}… may use; split it into smaller requests.",
                    retry_after=60.0, key_id=record.id,
                )
            ops.append(Op(limit_name(record.id, "tpm"), record.tpm, tokens))
        ps = periods(record, now)
        ops += [p.op(tokens) for p in ps]
        if not ops:
            return
        out = await self._apply(record, ops, ps)
        if not out.ok:
            i = out.refused
            if record.tpm and i == 0:
                headers: dict[str, str] = {}
                d = decide(False, out.values[0], record.tpm, tokens)
                self._headers(headers, "Tokens", d)
                raise self._limited(f"tokens per minute ({record.tpm})", d, headers, record)
            raise self.quotas.exceeded(record, ps[i - bool(record.tpm)], now, out.values[i], tokens)

    async def record_usage(
        self, principal: Principal, *, model: str, tokens: int, reserved: int = 0, cached_tokens: int = 0,
        requests: int = 1,
    ) -> None:
        """Bill ``tokens`` (computed) and count ``cached_tokens`` (served from the cache, not billed);
        settle ``tokens - reserved`` with the limits :meth:`reserve_tokens` charged. Call it before
        the reply leaves: the usage journal has the line once this returns. A request that failed
        after its reservation gives it back with ``tokens=0, requests=0`` (nothing is billed)."""
        now = self.clock()
        if requests or tokens or cached_tokens:
            self.usage.add(principal.key_id, model, utc_day(now), requests=requests, tokens=tokens,
                           cached_tokens=cached_tokens)
        record = await self._record_for(principal)
        if record is None:
            return
        delta = tokens - reserved
        if not delta:
            return
        # Forced: what was served is billed whatever the limits say now; a negative delta refunds
        # (the cache served part of what was reserved).
        ps = periods(record, now)
        ops = [Op(limit_name(record.id, "tpm"), record.tpm, delta, force=True)] if record.tpm else []
        ops += [p.op(delta, force=True) for p in ps]
        if ops:
            await self._apply(record, ops, ps)

    async def _record_for(self, principal: Principal) -> KeyRecord | None:
        record = self._recent.get(principal.key_id)
        if record is None and principal.key_id != "anonymous":
            # Dropped from the bounded map: the limits must still apply, so ask the store.
            with contextlib.suppress(GazsiError):
                record = await self.store.find(principal.key_id)
            if record is not None:
                self._recent[record.id] = record
        return record

    # -- lookups -------------------------------------------------------------------------
    async def _lookup(self, digest: str) -> KeyRecord:
        record = await self.tier.get(digest) if self.tier is not None else None
        self._set_degraded()
        if record is not None:
            self.metrics.lookups.labels("redis").inc()
        else:
            try:
                record = await self.store.get_by_hash(digest)
                rotated = await self.store.rotated_away(digest) if record is None else None
            except GazsiError:
                self.db_ok = False
                self.metrics.degraded.labels("database").set(1)
                raise
            self.db_ok = True
            self.metrics.degraded.labels("database").set(0)
            self.metrics.lookups.labels("database").inc()
            if rotated is not None:
                raise KeyRevoked(f"This API key was replaced by a rotation at {format_utc(rotated.at)}; "
                                 "use the key issued then.", key_id=rotated.key_id)
            if record is None:
                raise AuthenticationError("Incorrect API key provided.")
            if self.tier is not None:
                await self.tier.fill(record)
        self.local.put(record)
        return record

    def evict(self, key_hash: str) -> None:
        self.local.evict(key_hash)

    def _on_change(self, kind: str, key_hash: str, record: KeyRecord | None) -> None:
        """A change made through this process's own ``admin``: apply it here at once."""
        self.local.evict(key_hash, tombstone=kind != "update")
        if record is not None:
            self._recent.pop(record.id, None)
            if kind != "rotate":
                self.local.put(record)

    def _on_message(self, message: str) -> None:
        kind, key_hash = parse_change(message)
        self.metrics.revocations.inc()
        # After an update the publisher already wrote the new record to the Redis tier.
        self.local.evict(key_hash, tombstone=kind != "update")
        for key_id, record in list(self._recent.items()):
            if record.key_hash == key_hash:
                del self._recent[key_id]

    async def _apply_event(self, event: KeyEvent) -> None:
        """A change from the store's feed: evict, and replace the shared copy with the new state."""
        self.metrics.key_events.labels(event.kind).inc()
        self.local.evict(event.key_hash, tombstone=event.kind != "update")
        self._recent.pop(event.key_id, None)
        fresh = await self.store.find(event.key_id)
        if self.tier is not None:
            if event.kind == "rotate":
                await self.tier.replace(event.key_hash, None)
            if fresh is not None:
                await self.tier.replace(fresh.key_hash, fresh)
        if fresh is not None and event.kind != "rotate":
            self.local.put(fresh)

    def _set_degraded(self) -> None:
        if self.redis is not None:
            self._redis_degraded.set(1 if self.redis_health.degraded else 0)

    # -- limits --------------------------------------------------------------------------
    async def _check_limits(self, record: KeyRecord, now: float) -> tuple[tuple[str, str], ...]:
        """Budgets left, tokens/minute positive, and one request slot: one all-or-nothing step, so
        a request refused for its budget or tokens costs no request slot."""
        ps = periods(record, now)
        ops = [p.op(0) for p in ps]
        if record.tpm:
            ops.append(Op(limit_name(record.id, "tpm"), record.tpm, 0))
        if record.rpm:
            ops.append(Op(limit_name(record.id, "rpm"), record.rpm, 1))
        if not ops:
            return ()
        if ps:
            await self.quotas.refresh(record, ps)
        out = await self._apply(record, ops, ps)
        headers: dict[str, str] = {}
        i = len(ps)
        tok = req = None
        if record.tpm:
            tok = decide(out.refused != i, out.values[i], record.tpm, 0)
            self._headers(headers, "Tokens", tok)
            i += 1
        if record.rpm:
            req = decide(out.refused != i, out.values[i], record.rpm, 1)
            self._headers(headers, "Requests", req)
        self._set_degraded()
        if not out.ok:
            if out.refused < len(ps):
                raise self.quotas.exceeded(record, ps[out.refused], now, out.values[out.refused], None)
            if tok is not None and not tok.allowed:
                raise self._limited(f"tokens per minute ({record.tpm})", tok, headers, record)
            assert req is not None
            raise self._limited(f"requests per minute ({record.rpm})", req, headers, record)
        return tuple(headers.items())

    async def _apply(self, record: KeyRecord, ops: list[Op], ps: tuple[Period, ...]) -> Outcome:
        """``limiter.apply``, seeding budget counters the limiter does not hold yet from the store."""
        out = await self.limiter.apply(ops)
        for _ in range(len(ps)):
            if out.unseeded < 0:
                break
            period = next(p for p in ps if p.counter == ops[out.unseeded].name)
            ops[out.unseeded] = period.op(ops[out.unseeded].cost, force=ops[out.unseeded].force,
                                          seed=await self.quotas.seed(record, period))
            out = await self.limiter.apply(ops)
        if out.unseeded >= 0:
            raise ServiceUnavailable("budget counters could not be seeded; try again", retry_after=1.0)
        return out

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

    # -- health --------------------------------------------------------------------------
    def limits_scope(self) -> str:
        """Who shares this process's limits right now: "cluster" (Redis), "node" or "process"."""
        if self.redis is not None and not self.redis_health.degraded:
            return "cluster"
        return self.node_limiter.scope

    def status(self) -> dict[str, Any]:
        """For ``/readyz`` details: auth keeps working while degraded, so this never flips readiness."""
        redis_state = "disabled" if self.redis is None else ("degraded" if self.redis_health.degraded else "ok")
        scope = self.limits_scope()
        return {
            "backend": type(self.store).__name__,
            "database": "ok" if self.db_ok else "degraded",
            "redis": redis_state,
            "degraded": (not self.db_ok) or redis_state == "degraded",
            "cached_keys": len(self.local),
            "usage_pending_rows": self.usage.pending(),
            "usage_journal": self.usage.journal is not None,
            # Rate limits and budgets hold across this scope; "node"/"process" means each node (or
            # process) enforces the full limit on its own: N of them let N times the limit through.
            "limits_scope": scope,
            "limits_note": {
                "cluster": "limits and budgets are shared by every node through Redis",
                "node": "limits and budgets hold per node (no shared store): each node allows the full limit",
                "process": "limits and budgets hold per process (no shared store): each process allows the full limit",
            }[scope],
            "revocation": ("redis pub/sub + " if self.redis is not None else "")
            + (f"store poll every {self.config.key_events_poll_s:g}s" if self.watcher else "cache TTL"),
        }
