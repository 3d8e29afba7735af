"""The per-process usage journal: written before the reply, kept while the store is down, applied
exactly once, replayed from dead processes, and read through by ``gazsi keys usage``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest

from gazsi_cluster.auth.admin import KeyAdmin
from gazsi_cluster.auth.factory import open_store
from gazsi_cluster.auth.keys import UsageRow
from gazsi_cluster.auth.store import KeyStore
from gazsi_cluster.auth.usage import UsageBuffer
from gazsi_cluster.auth.usage_journal import UsageJournal, read_journals, read_segment
from gazsi_cluster.errors import ServiceUnavailable

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

DAY = date(2026, 11, 22)


class FlakyStore:
    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.down = False
        self.applied_calls = 0

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name in ("start", "close") or not callable(attr):
            return attr

        async def call(*a: object, **kw: object) -> object:
            if self.down:
                raise ServiceUnavailable("key store unavailable: test")
            if name == "apply_journal":
                self.applied_calls += 1
            return await attr(*a, **kw)

        return call


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FlakyStore]:
    inner = open_store(None, tmp_path)
    await inner.start()
    try:
        yield FlakyStore(inner)
    finally:
        await inner.close()


def buffer(store: FlakyStore, directory: Path, *, max_rows: int = 100) -> UsageBuffer:
    b = UsageBuffer(store, max_rows=max_rows, journal=UsageJournal(directory))  # type: ignore[arg-type]
    b.open()
    return b


def totals(rows: list[UsageRow]) -> tuple[int, int, int]:
    return sum(r.requests for r in rows), sum(r.tokens for r in rows), sum(r.cached_tokens for r in rows)


async def test_each_increment_is_on_disk_before_any_flush(store: FlakyStore, tmp_path: Path) -> None:
    b = buffer(store, tmp_path / "j")
    b.add("k", "m", DAY, tokens=7, cached_tokens=2)
    b.add("k", "m", DAY, tokens=5)
    (seg,) = read_journals(tmp_path / "j")  # another process reading now sees both
    assert seg.writer == b.journal.writer and totals(list(seg.rows)) == (2, 12, 2)  # type: ignore[union-attr]
    assert await b.flush()
    assert totals(await store.usage()) == (2, 12, 2)
    assert read_journals(tmp_path / "j") == []  # applied segments are deleted
    b.close()
    assert list((tmp_path / "j").iterdir()) == []  # and a clean close leaves nothing behind


async def test_outage_keeps_segments_then_applies_them_once(store: FlakyStore, tmp_path: Path) -> None:
    b = buffer(store, tmp_path / "j")
    store.down = True
    for i in range(30):
        b.add(f"k{i % 3}", "m", DAY, tokens=10)
        if i % 10 == 9:
            assert not await b.flush()  # each failed flush seals a segment and keeps it
    assert b.journal is not None and len(b.journal.sealed) == 3 and all(s.synced for s in b.journal.sealed)
    assert b.pending() == 9 and b.dropped == 0
    store.down = False
    assert await b.flush()
    assert totals(await store.usage()) == (30, 300, 0)
    assert await b.flush() and totals(await store.usage()) == (30, 300, 0)
    b.close()


async def test_more_distinct_rows_than_the_buffer_holds_are_not_dropped(store: FlakyStore, tmp_path: Path) -> None:
    b = buffer(store, tmp_path / "j", max_rows=4)
    store.down = True
    for i in range(50):
        b.add(f"k{i}", "m", DAY, tokens=1)  # 50 distinct rows through a 4-row buffer
    assert b.dropped == 0
    assert b.journal is not None
    assert any(s.rows is None for s in b.journal.sealed)  # old segments were let go from memory
    store.down = False
    assert await b.flush()
    assert totals(await store.usage()) == (50, 50, 0)
    b.close()


async def test_a_dead_writers_journal_is_replayed_exactly_once(store: FlakyStore, tmp_path: Path) -> None:
    d = tmp_path / "j"
    dead = buffer(store, d)
    store.down = True
    dead.add("k", "m", DAY, tokens=3)
    assert not await dead.flush()
    dead.add("k", "m", DAY, tokens=4)  # still in its active segment when it "dies"
    survivor = buffer(store, d)
    store.down = False
    assert dead.journal is not None
    assert survivor.journal is not None and survivor.journal.orphans() == []  # alive: its lock is held
    # kill -9: the kernel drops the lock; nothing else happens (no flush, no close).
    assert dead.journal._lock_fd is not None
    os.close(dead.journal._lock_fd)
    assert await survivor.flush()
    assert totals(await store.usage()) == (2, 7, 0)
    assert survivor.replayed_segments == 2 and read_journals(d) == []
    assert not (d / f"{dead.journal.writer}.lock").exists()
    survivor.close()


async def test_a_crash_between_commit_and_delete_is_not_counted_twice(store: FlakyStore, tmp_path: Path) -> None:
    d = tmp_path / "j"
    b = buffer(store, d)
    b.add("k", "m", DAY, tokens=5)
    assert b.journal is not None
    b._seal()
    await store.apply_journal(b.journal.segments())  # the store took it; then the process died
    assert b.journal._lock_fd is not None
    os.close(b.journal._lock_fd)
    replayer = buffer(store, d)
    assert await replayer.flush()  # finds the orphan, offers it, the mark says it is in already
    assert totals(await store.usage()) == (1, 5, 0)
    assert read_journals(d) == []
    replayer.close()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "w.00000001.jsonl"
    path.write_bytes(b'["k","m","2026-11-22",1,5,0]\n["k","m","2026-11-22",1,9')
    assert [(r.requests, r.tokens) for r in read_segment(path)] == [(1, 5)]


async def test_keys_usage_reads_through_unapplied_journals(store: FlakyStore, tmp_path: Path) -> None:
    d = tmp_path / "j"
    admin = KeyAdmin(store, env="test", journal_dir=d)  # type: ignore[arg-type]
    key = (await admin.create(name="served")).record
    b = buffer(store, d)
    b.add(key.id, "m", DAY, tokens=10)
    assert await b.flush()
    b.add(key.id, "m", DAY, tokens=4, cached_tokens=6)  # served, not flushed yet: today's lag
    assert b.journal is not None
    store.down = True
    assert not await b.flush()  # and one sealed segment the store refused
    b.add(key.id, "m", DAY, tokens=1)
    store.down = False
    rows = await admin.usage(ident=key.id)
    assert totals(rows) == (3, 15, 6)  # everything served, nothing twice
    assert await b.flush()
    assert totals(await admin.usage(ident=key.id)) == (3, 15, 6)
    assert totals(await admin.usage(ident=key.id, since=date(2026, 11, 23))) == (0, 0, 0)
    b.close()


async def test_an_unwritable_journal_directory_turns_the_journal_off(store: FlakyStore, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    b = UsageBuffer(store, journal=UsageJournal(blocker / "j"))  # type: ignore[arg-type]
    b.open()
    assert b.journal is None
    b.add("k", "m", DAY, tokens=1)
    assert await b.flush() and totals(await store.usage()) == (1, 1, 0)
