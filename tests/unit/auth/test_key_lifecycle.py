"""Key lifecycle through the authorizer (embedded SQLite in a temp dir): expiry, allowed models,
budgets charged before the work, rotation that keeps limit windows and usage, updates reaching
other authorizers through the store's change feed, and where limits hold (``/readyz``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gazsi_cluster.auth.authorizer import KeyAuthorizer
from gazsi_cluster.auth.factory import open_store
from gazsi_cluster.auth.limits import LocalRateLimiter, limit_name
from gazsi_cluster.auth.shared_limits import SharedBuckets
from gazsi_cluster.config import AuthConfig
from gazsi_cluster.errors import (
    AuthenticationError,
    KeyExpired,
    KeyRevoked,
    ModelNotAllowed,
    QuotaExceeded,
    RateLimited,
)
from gazsi_cluster.http.errors import error_reply

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

DAY = 86_400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # 2027-01-15 08:00 UTC

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: Clock, **cfg: object) -> KeyAuthorizer:
    config = AuthConfig(key_env="test", **cfg)  # type: ignore[arg-type]
    return KeyAuthorizer(open_store(None, tmp_path), config, clock=clock, journal_dir=tmp_path / "journal")


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[KeyAuthorizer]:
    a = make(tmp_path, Clock(), key_events_poll_s=0)
    await a.start()
    try:
        yield a
    finally:
        await a.close()


def bearer(key: str) -> str:
    return f"Bearer {key}"


async def test_expiry_is_401_with_its_own_code(auth: KeyAuthorizer) -> None:
    clock = auth.clock
    assert isinstance(clock, Clock)
    new = await auth.admin.create(name="short", expires_in_s=30 * DAY)
    assert new.record.expires_at == pytest.approx(clock.now + 30 * DAY)
    await auth.authorize(bearer(new.key))
    clock.now += 30 * DAY + 1  # still in the in-process cache: expiry is checked on every request
    with pytest.raises(KeyExpired) as info:
        await auth.authorize(bearer(new.key))
    reply = error_reply(info.value)
    assert reply.status == 401 and b'"code":"api_key_expired"' in reply.body
    assert "expired at 2027-02-14" in info.value.message and new.key not in info.value.message
    await auth.admin.update(new.record.id, expires_in_s=DAY)  # extending it works at once here
    assert (await auth.authorize(bearer(new.key))).key_id == new.record.id


async def test_allowed_models_is_403_model_not_allowed(auth: KeyAuthorizer) -> None:
    new = await auth.admin.create(name="m", scopes=["all-MiniLM-L6-v2"])
    await auth.authorize(bearer(new.key), model="all-MiniLM-L6-v2")
    with pytest.raises(ModelNotAllowed) as info:
        await auth.authorize(bearer(new.key), model="bge-large")
    reply = error_reply(info.value)
    assert reply.status == 403 and b'"code":"model_not_allowed"' in reply.body and info.value.param == "model"
    assert "`all-MiniLM-L6-v2`" in info.value.message  # says what is allowed


async def test_daily_budget_is_charged_before_the_work_and_resets(auth: KeyAuthorizer) -> None:
    clock = auth.clock
    assert isinstance(clock, Clock)
    new = await auth.admin.create(name="b", daily_quota=100)
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.reserve_tokens(p, model="m", tokens=60)
    with pytest.raises(QuotaExceeded) as info:  # 60 + 50 > 100: refused before it runs
        await auth.reserve_tokens(p, model="m", tokens=50)
    assert info.value.code == "insufficient_quota" and "only 40 of the daily token budget of 100" in info.value.message
    assert error_reply(info.value).status == 429
    await auth.record_usage(p, model="m", tokens=60, reserved=60)
    await auth.reserve_tokens(p, model="m", tokens=40)
    await auth.record_usage(p, model="m", tokens=40, reserved=40)
    with pytest.raises(QuotaExceeded, match=r"daily token budget of 100 tokens .* is spent; it resets at 2027-01-16"):
        await auth.authorize(bearer(new.key), model="m")
    clock.now += DAY  # a new UTC day, a new budget
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.reserve_tokens(p, model="m", tokens=100)


async def test_cache_hits_are_refunded_to_tpm_and_budget(auth: KeyAuthorizer) -> None:
    new = await auth.admin.create(name="c", tpm=100, daily_quota=100)
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.reserve_tokens(p, model="m", tokens=90)
    # The cache served 80 of the 90 tokens: only 10 are billed, 80 go back.
    await auth.record_usage(p, model="m", tokens=10, reserved=90, cached_tokens=80)
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.reserve_tokens(p, model="m", tokens=85)  # fits again in both
    await auth.usage.flush()
    rows = await auth.store.usage(key_id=new.record.id)
    assert [(r.requests, r.tokens, r.cached_tokens) for r in rows] == [(1, 10, 80)]


async def test_reserve_is_all_or_nothing(auth: KeyAuthorizer) -> None:
    new = await auth.admin.create(name="aon", tpm=1000, daily_quota=50)
    p = await auth.authorize(bearer(new.key), model="m")
    with pytest.raises(QuotaExceeded):
        await auth.reserve_tokens(p, model="m", tokens=60)  # tpm had room, the budget had not
    tok = await auth.limiter.acquire(limit_name(new.record.id, "tpm"), capacity=1000, cost=0)
    assert tok.remaining == 1000  # what tpm took was given back
    with pytest.raises(RateLimited, match="split it into smaller requests"):
        await auth.reserve_tokens(p, model="m", tokens=1001)


async def test_rotation_keeps_limit_windows_budget_and_usage(auth: KeyAuthorizer) -> None:
    new = await auth.admin.create(name="r", rpm=3, daily_quota=100)
    for _ in range(2):
        p = await auth.authorize(bearer(new.key), model="m")
        await auth.reserve_tokens(p, model="m", tokens=30)
        await auth.record_usage(p, model="m", tokens=30, reserved=30)
    rotated = await auth.admin.rotate(new.record.id)
    with pytest.raises(KeyRevoked, match="rotation"):
        await auth.authorize(bearer(new.key), model="m")
    p = await auth.authorize(bearer(rotated.key), model="m")  # the third request of the minute
    assert p.key_id == new.record.id
    with pytest.raises(QuotaExceeded):
        await auth.reserve_tokens(p, model="m", tokens=50)  # 60 of 100 already used before rotating
    with pytest.raises(RateLimited, match="requests per minute"):
        await auth.authorize(bearer(rotated.key), model="m")  # the window carried over
    await auth.usage.flush()
    rows = await auth.store.usage(key_id=new.record.id)
    assert sum(r.tokens for r in rows) == 60 and sum(r.requests for r in rows) == 2


async def test_old_secret_after_rotation_is_refused_even_when_uncached(tmp_path: Path) -> None:
    a = make(tmp_path, Clock(), key_events_poll_s=0)
    await a.start()
    try:
        new = await a.admin.create(name="x")
        rotated = await a.admin.rotate(new.record.id)
        a.local.clear()
        with pytest.raises(KeyRevoked, match="replaced by a rotation"):
            await a.authorize(bearer(new.key))
        assert (await a.authorize(bearer(rotated.key))).key_id == new.record.id
    finally:
        await a.close()


async def test_changes_reach_another_authorizer_through_the_change_feed(tmp_path: Path) -> None:
    clock = Clock()
    # The background poller waits a minute between polls: this test polls by hand.
    serving, admin = make(tmp_path, clock, key_events_poll_s=60), make(tmp_path, clock, key_events_poll_s=0)
    await serving.start()
    await admin.start()
    try:
        assert serving.watcher is not None
        await serving.watcher.poll_once()  # learns where the feed is
        keep, gone, limited = [await admin.admin.create(name=n) for n in ("keep", "gone", "limited")]
        rotated = await admin.admin.create(name="rotated")
        for k in (keep, gone, limited, rotated):
            await serving.authorize(bearer(k.key), model="m")  # all cached, TTL 30 s
        await admin.admin.revoke(gone.record.id)
        await admin.admin.update(limited.record.id, scopes=["other"])
        new_secret = await admin.admin.rotate(rotated.record.id)
        assert await serving.watcher.poll_once() == 3
        with pytest.raises(KeyRevoked):
            await serving.authorize(bearer(gone.key), model="m")
        with pytest.raises(ModelNotAllowed):
            await serving.authorize(bearer(limited.key), model="m")
        with pytest.raises(AuthenticationError):
            await serving.authorize(bearer(rotated.key), model="m")
        await serving.authorize(bearer(new_secret.key), model="m")
        await serving.authorize(bearer(keep.key), model="m")
        assert serving.metrics.key_events.labels("revoke")._value.get() == 1
    finally:
        await serving.close()
        await admin.close()


async def test_status_says_where_limits_hold(tmp_path: Path) -> None:
    alone = make(tmp_path / "a", Clock())
    assert alone.status()["limits_scope"] == "process" and "per process" in alone.status()["limits_note"]
    whole_node = KeyAuthorizer(open_store(None, tmp_path / "c"), AuthConfig(),
                               limiter=LocalRateLimiter(scope="node"))  # a single-process edge
    assert whole_node.status()["limits_scope"] == "node"
    with SharedBuckets.create(entries=256, stripes=4) as table:
        node = KeyAuthorizer(open_store(None, tmp_path / "b"), AuthConfig(), limiter=table)
        status = node.status()
        assert status["limits_scope"] == "node" and "per node" in status["limits_note"]
        assert "store poll every 0.25s" in status["revocation"]


async def test_limits_apply_after_the_recent_map_forgets_a_key(auth: KeyAuthorizer) -> None:
    new = await auth.admin.create(name="f", tpm=10)
    p = await auth.authorize(bearer(new.key), model="m")
    auth._recent.clear()  # e.g. the map was full
    with pytest.raises(RateLimited):
        await auth.reserve_tokens(p, model="m", tokens=11)


async def test_a_failed_request_gives_its_reservation_back_unbilled(auth: KeyAuthorizer) -> None:
    new = await auth.admin.create(name="fail", tpm=100, daily_quota=100)
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.reserve_tokens(p, model="m", tokens=90)
    await auth.record_usage(p, model="m", tokens=0, reserved=90, requests=0)  # the engine failed
    p = await auth.authorize(bearer(new.key), model="m")
    await auth.reserve_tokens(p, model="m", tokens=90)  # all of it is back
    await auth.usage.flush()
    assert await auth.store.usage(key_id=new.record.id) == []  # and nothing was billed or counted
