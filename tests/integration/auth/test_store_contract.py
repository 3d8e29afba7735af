"""One contract, two backends: embedded SQLite and a real (throwaway) PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest

from gazsi_cluster.auth.admin import KeyAdmin
from gazsi_cluster.auth.factory import open_store
from gazsi_cluster.auth.keys import UsageRow, hash_key
from gazsi_cluster.auth.store import JournalSegment, KeyStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    s = open_store(url, tmp_path)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_migrations_are_idempotent(store: KeyStore, tmp_path: Path) -> None:
    admin = KeyAdmin(store, env="test")
    new = await admin.create(name="a")
    await store.start()  # a second start (another replica, a restart) applies nothing twice
    assert (await store.get_by_hash(new.record.key_hash)) == new.record
    assert isinstance(store, KeyStore)


async def test_create_lookup_find_list(store: KeyStore) -> None:
    admin = KeyAdmin(store, env="test")
    new = await admin.create(name="svc", owner="team-a", scopes=["m1", "m2"], rpm=5, tpm=100,
                             monthly_quota=1000, expires_days=1)
    assert new.key.startswith("gz_test_") and new.record.prefix == new.key[: len("gz_test_") + 8]
    assert new.record.key_hash == hash_key(new.key) and new.key not in repr(new.record)
    got = await store.get_by_hash(hash_key(new.key))
    assert got == new.record
    assert got.scopes == ("m1", "m2") and got.rpm == 5 and got.monthly_quota == 1000
    assert await store.find(new.record.id) == got
    assert await store.find(new.record.prefix) == got
    assert await store.find("nope") is None
    assert await store.get_by_hash(hash_key("gz_test_" + "x" * 43)) is None
    other = await admin.create(name="other")
    assert [r.id for r in await store.list_keys()] == [new.record.id, other.record.id]


async def test_revoke_keeps_first_time_and_rotate(store: KeyStore) -> None:
    admin = KeyAdmin(store, env="test")
    new = await admin.create(name="r", rpm=7)
    first = await store.revoke(new.record.id, 1000.0)
    assert first is not None and first.revoked_at == 1000.0
    again = await store.revoke(new.record.id, 2000.0)
    assert again is not None and again.revoked_at == 1000.0
    assert await store.revoke("key_missing", 1.0) is None
    fresh = await KeyAdmin(store, env="test").create(name="to-rotate", tpm=9)
    rotated = await admin.rotate(fresh.record.prefix)
    assert rotated.key != fresh.key and rotated.record.tpm == 9 and rotated.record.name == "to-rotate"
    # In place: same id (usage and limit windows carry over), new secret, old secret gone.
    assert rotated.record.id == fresh.record.id and rotated.record.revoked_at is None
    assert await store.find(fresh.record.id) == rotated.record
    assert (await store.get_by_hash(hash_key(rotated.key))) == rotated.record
    assert await store.get_by_hash(fresh.record.key_hash) is None
    retired = await store.rotated_away(fresh.record.key_hash)
    assert retired is not None and retired.key_id == fresh.record.id and retired.kind == "rotate"
    assert await store.rotated_away(rotated.record.key_hash) is None


async def test_usage_upserts_and_filters(store: KeyStore) -> None:
    d1, d2 = date(2026, 11, 1), date(2026, 11, 2)
    await store.add_usage([UsageRow("k1", "m", d1, 1, 10), UsageRow("k2", "m", d1, 2, 20)])
    await store.add_usage([UsageRow("k1", "m", d1, 3, 30), UsageRow("k1", "m", d2, 1, 5)])
    rows = await store.usage(key_id="k1")
    assert [(r.day, r.requests, r.tokens) for r in rows] == [(d1, 4, 40), (d2, 1, 5)]
    assert [r.key_id for r in await store.usage(since=d1, until=d1)] == ["k1", "k2"]
    assert await store.tokens_since("k1", d2) == 5
    assert await store.tokens_since("k1", d1) == 45
    assert await store.tokens_since("nobody", d1) == 0


async def test_expiry_is_stored(store: KeyStore) -> None:
    admin = KeyAdmin(store, env="test", clock=lambda: 1_000_000.0)
    new = await admin.create(name="e", expires_days=2)
    got = await store.get_by_hash(new.record.key_hash)
    assert got is not None and got.expires_at == pytest.approx(1_000_000.0 + 2 * 86_400)
    assert got.created_at == pytest.approx(1_000_000.0)


async def test_postgres_down_is_service_unavailable(tmp_path: Path) -> None:
    from gazsi_cluster.errors import ServiceUnavailable

    s = open_store("postgresql://postgres@127.0.0.1:1/postgres", tmp_path)
    with pytest.raises(ServiceUnavailable):
        await s.start()


async def test_change_feed_orders_revoke_rotate_update(store: KeyStore) -> None:
    admin = KeyAdmin(store, env="test")
    start = await store.last_event_seq()
    a, b = await admin.create(name="a"), await admin.create(name="b", rpm=5)
    assert await store.events_since(start) == []  # creating a key is nothing to evict
    await admin.revoke(a.record.id)
    rotated = await admin.rotate(b.record.id)
    updated = await admin.update(b.record.id, rpm=9, daily_quota=100, scopes=["m1"])
    assert (updated.rpm, updated.daily_quota, updated.scopes) == (9, 100, ("m1",))
    assert updated.key_hash == rotated.record.key_hash and await store.find(b.record.id) == updated
    events = await store.events_since(start)
    assert [(e.kind, e.key_id, e.key_hash) for e in events] == [
        ("revoke", a.record.id, a.record.key_hash),
        ("rotate", b.record.id, b.record.key_hash),  # the old secret's hash: the one to evict
        ("update", b.record.id, rotated.record.key_hash),
    ]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert await store.last_event_seq() == events[-1].seq
    assert [e.kind for e in await store.events_since(events[0].seq, limit=1)] == ["rotate"]
    cleared = await admin.update(b.record.id, rpm=0)
    assert cleared.rpm is None and cleared.daily_quota == 100


async def test_journal_segments_apply_exactly_once(store: KeyStore) -> None:
    d = date(2026, 11, 3)
    s1 = JournalSegment("w1", 1, (UsageRow("k", "m", d, 2, 20, 5),))
    s2 = JournalSegment("w1", 2, (UsageRow("k", "m", d, 1, 10, 0),))
    s3 = JournalSegment("w2", 1, (UsageRow("k", "m", d, 1, 7, 1),))
    assert await store.apply_journal([s1]) == 1
    assert await store.apply_journal([s1, s2, s3]) == 2  # s1 again: skipped
    assert await store.apply_journal([s2, s3]) == 0  # a retry after a lost reply: nothing twice
    rows = await store.usage(key_id="k")
    assert [(r.requests, r.tokens, r.cached_tokens) for r in rows] == [(4, 37, 6)]
    assert await store.journal_marks(["w1", "w2", "w3"]) == {"w1": 2, "w2": 1}
    rows, marks = await store.usage_with_marks(["w1", "w3"], key_id="k")
    assert marks == {"w1": 2} and rows[0].tokens == 37
