"""Embedded key store: SQLite in a file under the data directory (the default, no services)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path
from typing import Any

import aiosqlite

from gazsi_cluster.auth.keys import KeyRecord, UsageRow
from gazsi_cluster.auth.store import (
    COLUMNS,
    JournalSegment,
    KeyEvent,
    load_migrations,
    merge_rows,
    new_segments,
    record_from_row,
    record_params,
    update_params,
)
from gazsi_cluster.errors import ServiceUnavailable

__all__ = ["SqliteKeyStore"]

_UPSERT_USAGE = (
    "INSERT INTO key_usage (key_id, model, day, requests, tokens, cached_tokens) VALUES (?,?,?,?,?,?) "
    "ON CONFLICT (key_id, model, day) DO UPDATE SET requests = requests + excluded.requests, "
    "tokens = tokens + excluded.tokens, cached_tokens = cached_tokens + excluded.cached_tokens"
)


def _usage_params(rows: Sequence[UsageRow]) -> list[tuple[object, ...]]:
    return [(r.key_id, r.model, r.day.isoformat(), r.requests, r.tokens, r.cached_tokens) for r in rows]


class SqliteKeyStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        # One connection per process: statements of two coroutines would otherwise share (and
        # commit) each other's implicit transaction. Every multi-statement unit holds this lock.
        self._tx = asyncio.Lock()

    async def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            raise ServiceUnavailable(f"key store unavailable: {exc}") from exc
        try:
            db.row_factory = sqlite3.Row
            # WAL lets the CLI write while edge processes read the same file.
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await self._migrate(db)
        except (OSError, sqlite3.Error) as exc:
            # aiosqlite's worker thread is not a daemon: an unclosed connection hangs interpreter exit.
            await db.close()
            raise ServiceUnavailable(f"key store unavailable: {exc}") from exc
        self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at REAL NOT NULL)"
        )
        await db.commit()
        # IMMEDIATE takes the write lock first, so two processes starting at once apply each file once.
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute("SELECT version FROM schema_migrations") as cur:
                done = {row[0] for row in await cur.fetchall()}
            for version, name, sql in load_migrations("sqlite"):
                if version in done:
                    continue
                code = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
                for statement in filter(None, (s.strip() for s in code.split(";"))):
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))
            await db.commit()
        except BaseException:
            await db.rollback()
            raise

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._db is None:
            raise ServiceUnavailable("key store is not started")
        try:
            yield self._db
        except (OSError, sqlite3.OperationalError, ValueError) as exc:
            raise ServiceUnavailable(f"key store unavailable: {exc}") from exc

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT, rolled back on error)."""
        async with self._tx, self._conn() as db:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.rollback()
                raise
            await db.commit()

    async def ping(self) -> None:
        async with self._conn() as db:
            await db.execute("SELECT 1")

    async def insert(self, record: KeyRecord) -> None:
        async with self._write() as db:
            await db.execute(f"INSERT INTO api_keys ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                             record_params(record))

    async def _one(self, sql: str, args: tuple[object, ...]) -> KeyRecord | None:
        async with self._conn() as db, db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return record_from_row(row) if row is not None else None

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._one(f"SELECT {COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,))

    async def find(self, ident: str) -> KeyRecord | None:
        return await self._one(f"SELECT {COLUMNS} FROM api_keys WHERE id = ? OR prefix = ?", (ident, ident))

    async def list_keys(self) -> list[KeyRecord]:
        async with self._conn() as db, db.execute(
            f"SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id"
        ) as cur:
            rows = await cur.fetchall()
        return [record_from_row(r) for r in rows]

    @staticmethod
    async def _event(db: aiosqlite.Connection, key_id: str, key_hash: str, kind: str, at: float) -> None:
        await db.execute("INSERT INTO key_events (key_id, key_hash, kind, at) VALUES (?,?,?,?)",
                         (key_id, key_hash, kind, at))

    @staticmethod
    async def _fetch(db: aiosqlite.Connection, key_id: str) -> KeyRecord | None:
        async with db.execute(f"SELECT {COLUMNS} FROM api_keys WHERE id = ?", (key_id,)) as cur:
            row = await cur.fetchone()
        return record_from_row(row) if row is not None else None

    async def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        async with self._write() as db:
            await db.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(MIN(revoked_at, ?), ?) WHERE id = ?", (at, at, key_id)
            )
            record = await self._fetch(db, key_id)
            if record is not None:
                await self._event(db, key_id, record.key_hash, "revoke", at)
        return record

    async def rotate(self, key_id: str, *, key_hash: str, prefix: str, at: float) -> KeyRecord | None:
        async with self._write() as db:
            old = await self._fetch(db, key_id)
            if old is None:
                return None
            await db.execute("UPDATE api_keys SET key_hash = ?, prefix = ? WHERE id = ?", (key_hash, prefix, key_id))
            await self._event(db, key_id, old.key_hash, "rotate", at)
            return await self._fetch(db, key_id)

    async def update(self, key_id: str, changes: Mapping[str, Any], at: float) -> KeyRecord | None:
        params = update_params(changes)
        async with self._write() as db:
            if params:
                sets = ", ".join(f"{k} = ?" for k in params)
                await db.execute(f"UPDATE api_keys SET {sets} WHERE id = ?", (*params.values(), key_id))
            record = await self._fetch(db, key_id)
            if record is not None:
                await self._event(db, key_id, record.key_hash, "update", at)
        return record

    async def events_since(self, seq: int, *, limit: int = 1000) -> list[KeyEvent]:
        async with self._conn() as db, db.execute(
            "SELECT seq, key_id, key_hash, kind, at FROM key_events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [KeyEvent(r[0], r[1], r[2], r[3], float(r[4])) for r in rows]

    async def last_event_seq(self) -> int:
        async with self._conn() as db, db.execute("SELECT COALESCE(MAX(seq), 0) FROM key_events") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def rotated_away(self, key_hash: str) -> KeyEvent | None:
        async with self._conn() as db, db.execute(
            "SELECT seq, key_id, key_hash, kind, at FROM key_events WHERE key_hash = ? AND kind = 'rotate' "
            "ORDER BY seq DESC LIMIT 1", (key_hash,),
        ) as cur:
            r = await cur.fetchone()
        return KeyEvent(r[0], r[1], r[2], r[3], float(r[4])) if r else None

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        async with self._write() as db:
            await db.executemany(_UPSERT_USAGE, _usage_params(rows))

    async def apply_journal(self, segments: Sequence[JournalSegment]) -> int:
        if not segments:
            return 0
        async with self._write() as db:
            marks = await self._marks(db, sorted({s.writer for s in segments}))
            fresh = new_segments(segments, marks)
            if fresh:
                await db.executemany(_UPSERT_USAGE, _usage_params(merge_rows(fresh)))
                last: dict[str, int] = {}
                for seg in fresh:
                    last[seg.writer] = max(last.get(seg.writer, 0), seg.seq)
                now = time.time()
                await db.executemany(
                    "INSERT INTO usage_journal (writer, applied_seq, updated_at) VALUES (?,?,?) "
                    "ON CONFLICT (writer) DO UPDATE SET applied_seq = MAX(applied_seq, excluded.applied_seq), "
                    "updated_at = excluded.updated_at",
                    [(w, s, now) for w, s in last.items()],
                )
        return len(fresh)

    @staticmethod
    async def _marks(db: aiosqlite.Connection, writers: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(writers), 500):  # SQLite's host-parameter limit
            chunk = list(writers[i:i + 500])
            marks = ",".join("?" * len(chunk))
            async with db.execute(
                f"SELECT writer, applied_seq FROM usage_journal WHERE writer IN ({marks})", chunk
            ) as cur:
                out.update({r[0]: int(r[1]) for r in await cur.fetchall()})
        return out

    async def journal_marks(self, writers: Sequence[str]) -> dict[str, int]:
        async with self._conn() as db:
            return await self._marks(db, list(writers))

    async def usage(
        self, *, key_id: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        async with self._conn() as db:
            return await self._usage(db, key_id, since, until)

    @staticmethod
    async def _usage(
        db: aiosqlite.Connection, key_id: str | None, since: date | None, until: date | None
    ) -> list[UsageRow]:
        sql = "SELECT key_id, model, day, requests, tokens, cached_tokens FROM key_usage WHERE 1=1"
        args: list[object] = []
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        if since is not None:
            sql += " AND day >= ?"
            args.append(since.isoformat())
        if until is not None:
            sql += " AND day <= ?"
            args.append(until.isoformat())
        sql += " ORDER BY day, key_id, model"
        async with db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [UsageRow(r["key_id"], r["model"], date.fromisoformat(r["day"]), r["requests"], r["tokens"],
                         r["cached_tokens"]) for r in rows]

    async def usage_with_marks(
        self, writers: Sequence[str], *, key_id: str | None = None, since: date | None = None,
        until: date | None = None,
    ) -> tuple[list[UsageRow], dict[str, int]]:
        # A deferred transaction: in WAL mode both reads see one snapshot.
        async with self._tx, self._conn() as db:
            await db.execute("BEGIN")
            try:
                marks = await self._marks(db, list(writers))
                rows = await self._usage(db, key_id, since, until)
            finally:
                await db.rollback()
        return rows, marks

    async def tokens_since(self, key_id: str, since: date) -> int:
        async with self._conn() as db, db.execute(
            "SELECT COALESCE(SUM(tokens), 0) FROM key_usage WHERE key_id = ? AND day >= ?",
            (key_id, since.isoformat()),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
