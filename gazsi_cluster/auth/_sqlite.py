"""Embedded key store: SQLite in a file under the data directory (the default, no services)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path

import aiosqlite

from gazsi_cluster.auth.keys import KeyRecord, UsageRow
from gazsi_cluster.auth.store import load_migrations, record_from_row, record_params
from gazsi_cluster.errors import ServiceUnavailable

__all__ = ["SqliteKeyStore"]

_COLUMNS = ("id, name, owner, prefix, key_hash, scopes, created_at, expires_at, revoked_at, rpm, tpm, "
            "monthly_quota")


class SqliteKeyStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

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

    async def ping(self) -> None:
        async with self._conn() as db:
            await db.execute("SELECT 1")

    async def insert(self, record: KeyRecord) -> None:
        async with self._conn() as db:
            await db.execute(f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                             record_params(record))
            await db.commit()

    async def _one(self, sql: str, args: tuple[object, ...]) -> KeyRecord | None:
        async with self._conn() as db, db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return record_from_row(row) if row is not None else None

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,))

    async def find(self, ident: str) -> KeyRecord | None:
        return await self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ? OR prefix = ?", (ident, ident))

    async def list_keys(self) -> list[KeyRecord]:
        async with self._conn() as db, db.execute(
            f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id"
        ) as cur:
            rows = await cur.fetchall()
        return [record_from_row(r) for r in rows]

    async def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        async with self._conn() as db:
            await db.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(MIN(revoked_at, ?), ?) WHERE id = ?", (at, at, key_id)
            )
            await db.commit()
        return await self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        async with self._conn() as db:
            await db.executemany(
                "INSERT INTO key_usage (key_id, model, day, requests, tokens) VALUES (?,?,?,?,?) "
                "ON CONFLICT (key_id, model, day) DO UPDATE SET requests = requests + excluded.requests, "
                "tokens = tokens + excluded.tokens",
                [(r.key_id, r.model, r.day.isoformat(), r.requests, r.tokens) for r in rows],
            )
            await db.commit()

    async def usage(
        self, *, key_id: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        sql = "SELECT key_id, model, day, requests, tokens FROM key_usage WHERE 1=1"
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
        async with self._conn() as db, db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [UsageRow(r["key_id"], r["model"], date.fromisoformat(r["day"]), r["requests"], r["tokens"])
                for r in rows]

    async def tokens_since(self, key_id: str, since: date) -> int:
        async with self._conn() as db, db.execute(
            "SELECT COALESCE(SUM(tokens), 0) FROM key_usage WHERE key_id = ? AND day >= ?",
            (key_id, since.isoformat()),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
