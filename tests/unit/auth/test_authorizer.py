"""The authorizer's decisions and failure modes, with an in-memory store that can go down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest

from gazsi_cluster.auth.authorizer import KeyAuthorizer
from gazsi_cluster.auth.factory import open_store
from gazsi_cluster.auth.keys import KeyRecord, UsageRow, display_prefix, generate_key, hash_key, parse_bearer
from gazsi_cluster.config import AuthConfig
from gazsi_cluster.errors import (
    AuthenticationError,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class FlakyStore:
    """A store wrapper whose database can be switched off."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.down = False
        self.lookups = 0

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name in ("start", "close") or not callable(attr):
            return attr

        async def call(*a: object, **kw: object) -> object:
            if self.down:
                raise ServiceUnavailable("key store unavailable: test")
            if name == "get_by_hash":
                self.lookups += 1
            return await attr(*a, **kw)

        return call


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[KeyAuthorizer, FlakyStore, Clock]]:
    store = FlakyStore(open_store(None, tmp_path))
    clock = Clock()
    auth = KeyAuthorizer(store, AuthConfig(key_env="test", cache_ttl_s=30), clock=clock)  # type: ignore[arg-type]
    await auth.start()
    try:
        yield auth, store, clock
    finally:
        await auth.close()


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_key_format_and_hash() -> None:
    key = generate_key("live")
    assert key.startswith("gz_live_") and len(key.split("_", 2)[2]) >= 32  # 32 bytes → 43 chars
    assert len({generate_key("live") for _ in range(100)}) == 100
    assert display_prefix(key) == key[:16] and hash_key(key) != hash_key(key + "x")
    assert parse_bearer(bearer(key)) == key


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Bearer sk-123", "Bearer gz_live_short",
                                    "Bearer gz__" + "a" * 40, "Token gz_live_" + "a" * 43])
async def test_missing_or_malformed_header_is_401(env: tuple[KeyAuthorizer, FlakyStore, Clock],
                                                  header: str | None) -> None:
    auth, _, _ = env
    with pytest.raises(AuthenticationError) as info:
        await auth.authorize(header)
    assert "gz_live_" + "a" * 43 not in info.value.message


async def test_unknown_key_is_401_and_never_echoed(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, _, _ = env
    key = generate_key("test")
    with pytest.raises(AuthenticationError) as info:
        await auth.authorize(bearer(key))
    assert key not in info.value.message and key[8:] not in repr(info.value)


async def test_valid_key_scopes_and_admin(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, _, _ = env
    new = await auth.admin.create(name="m1-only", scopes=["m1"])
    p = await auth.authorize(bearer(new.key), model="m1")
    assert p.key_id == new.record.id and p.scopes == frozenset({"m1"})
    with pytest.raises(PermissionDenied):
        await auth.authorize(bearer(new.key), model="m2")
    with pytest.raises(PermissionDenied):
        await auth.authorize(bearer(new.key), admin=True)
    adm = await auth.admin.create(name="ops", scopes=["m1"], admin=True)
    assert (await auth.authorize(bearer(adm.key), admin=True)).key_id == adm.record.id


async def test_expired_and_revoked_are_401(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, _, clock = env
    new = await auth.admin.create(name="short", expires_days=1)
    await auth.authorize(bearer(new.key))
    clock.now += 86_401  # still in the in-process cache: expiry is checked on every request
    with pytest.raises(AuthenticationError, match="expired"):
        await auth.authorize(bearer(new.key))
    other = await auth.admin.create(name="to-revoke")
    await auth.authorize(bearer(other.key))
    await auth.admin.revoke(other.record.prefix)  # in-process revocation evicts at once
    with pytest.raises(AuthenticationError, match="revoked"):
        await auth.authorize(bearer(other.key))


async def test_database_down_cached_keys_work_new_keys_503(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, store, _ = env
    cached = await auth.admin.create(name="cached")
    uncached = await auth.admin.create(name="uncached")
    await auth.authorize(bearer(cached.key))
    store.down = True
    assert (await auth.authorize(bearer(cached.key))).key_id == cached.record.id
    with pytest.raises(ServiceUnavailable):
        await auth.authorize(bearer(uncached.key))
    assert auth.status()["database"] == "degraded" and auth.status()["degraded"]
    # Once the TTL passes, even the cached key needs the database: refused, never silently allowed.
    auth.local.clock = lambda: 10**12
    with pytest.raises(ServiceUnavailable):
        await auth.authorize(bearer(cached.key))
    store.down = False
    assert (await auth.authorize(bearer(uncached.key))).key_id == uncached.record.id
    assert auth.status()["database"] == "ok"


async def test_cached_key_skips_the_store(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, store, _ = env
    new = await auth.admin.create(name="hot")
    for _ in range(5):
        await auth.authorize(bearer(new.key))
    assert store.lookups == 1


async def test_rpm_limit_429_with_headers(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, _, _ = env
    new = await auth.admin.create(name="rl", rpm=3)
    ok = [await auth.authorize(bearer(new.key)) for _ in range(3)]
    assert dict(ok[0].headers)["X-RateLimit-Limit-Requests"] == "3"
    assert dict(ok[-1].headers)["X-RateLimit-Remaining-Requests"] == "0"
    with pytest.raises(RateLimited) as info:
        await auth.authorize(bearer(new.key))
    err = info.value
    assert err.status == 429 and err.retry_after > 0
    assert err.headers["X-RateLimit-Remaining-Requests"] == "0" and "requests per minute" in err.message


async def test_tpm_limit_counts_recorded_tokens(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, _, _ = env
    new = await auth.admin.create(name="tok", tpm=100)
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.record_usage(p, model="m", tokens=150)  # one big request may overdraw
    with pytest.raises(RateLimited, match="tokens per minute"):
        await auth.authorize(bearer(new.key), model="m")


async def test_monthly_quota_is_429_with_clear_message(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, store, clock = env
    new = await auth.admin.create(name="q", monthly_quota=1000)
    # 900 tokens already used this month, recorded by another process.
    month = date.fromtimestamp(clock.now).replace(day=1)
    await store.add_usage([UsageRow(new.record.id, "m", month, 9, 900)])
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.record_usage(p, model="m", tokens=100)
    with pytest.raises(QuotaExceeded) as info:
        await auth.authorize(bearer(new.key), model="m")
    assert info.value.code == "insufficient_quota" and "monthly token budget of 1000" in info.value.message


async def test_usage_is_buffered_then_written_in_batches(env: tuple[KeyAuthorizer, FlakyStore, Clock]) -> None:
    auth, store, _ = env
    new = await auth.admin.create(name="u")
    p = await auth.authorize(bearer(new.key), model="m")
    for _ in range(10):
        await auth.record_usage(p, model="m", tokens=7)
    assert await store.usage(key_id=new.record.id) == []  # nothing written on the request path
    assert auth.usage.pending() == 1
    store.down = True
    assert not await auth.usage.flush()  # kept, not lost, while the database is down
    store.down = False
    assert await auth.usage.flush()
    rows = await store.usage(key_id=new.record.id)
    assert [(r.requests, r.tokens) for r in rows] == [(10, 70)]


async def test_usage_buffer_is_bounded(tmp_path: Path) -> None:
    store = FlakyStore(open_store(None, tmp_path))
    auth = KeyAuthorizer(store, AuthConfig(usage_buffer_rows=3))  # type: ignore[arg-type]
    await auth.start()
    try:
        store.down = True
        for i in range(10):
            auth.usage.add(f"k{i}", "m", date(2026, 11, 22), tokens=1)
        assert auth.usage.pending() == 3 and auth.usage.dropped == 7
    finally:
        store.down = False
        await auth.close()


def test_record_never_exposes_hash() -> None:
    rec = KeyRecord(id="key_1", name="n", prefix="gz_x_abc", key_hash="f" * 64)
    assert "key_hash" not in rec.public()
    assert KeyRecord.from_cache(rec.to_cache()) == rec


