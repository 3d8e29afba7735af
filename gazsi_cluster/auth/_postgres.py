"""PostgreSQL key store through an asyncpg pool; migrations under an advisory lock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

import asyncpg

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

__all__ = ["PostgresKeyStore"]

_COLUMNS = COLUMNS
# Any fixed number shared by every GAZSI process: serialises concurrent migrators.
_MIGRATION_LOCK = 0x6A2E51
# Held by every transaction that logs a key event: sequence numbers are taken in commit order, so
# a poller that saw seq N never misses an N-1 committed later.
_EVENTS_LOCK = 0x6A2E52
_UPSERT_USAGE = (
    "INSERT INTO key_usage AS u (key_id, model, day, requests, tokens, cached_tokens) VALUES ($1,$2,$3,$4,$5,$6) "
    "ON CONFLICT (key_id, model, day) DO UPDATE SET requests = u.requests + excluded.requests, "
    "tokens = u.tokens + excluded.tokens, cached_tokens = u.cached_tokens + excluded.cached_tokens"
)


def _usage_params(rows: Sequence[UsageRow]) -> list[tuple[object, ...]]:
    return [(r.key_id, r.model, r.day, r.requests, r.tokens, r.cached_tokens) for r in rows]


def _event(r: Any) -> KeyEvent:
    return KeyEvent(int(r["seq"]), r["key_id"], r["key_hash"], r["kind"], float(r["at"]))
# Errors that mean "cannot talk to the database" rather than "bad query".
_DOWN = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
         asyncpg.ConnectionFailureError, asyncpg.PostgresConnectionError)


class PostgresKeyStore:
    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 3.0) -> None:
        self.dsn = dsn
        self._min, self._max, self._timeout = min_size, max_size, timeout_s
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self._min, max_size=self._max, timeout=self._timeout,
                command_timeout=self._timeout,
            )
        except _DOWN as exc:
            raise ServiceUnavailable(f"key store unavailable: {type(exc).__name__}") from exc
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in load_migrations("postgres"):
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, $3)", version, name,
                                       time.time())

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise ServiceUnavailable("key store is not started")
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except _DOWN as exc:
            raise ServiceUnavailable(f"key store unavailable: {type(exc).__name__}") from exc

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    async def insert(self, record: KeyRecord) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
                *record_params(record),
            )

    async def _one(self, sql: str, *args: object) -> KeyRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(sql, *args)
        return record_from_row(row) if row is not None else None

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash)

    async def find(self, ident: str) -> KeyRecord | None:
        return await self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1 OR prefix = $1", ident)

    async def list_keys(self) -> list[KeyRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id")
        return [record_from_row(r) for r in rows]

    async def _change(self, sql: str, args: Sequence[object], kind: str, at: float, *,
                      old_hash: bool = False) -> KeyRecord | None:
        """Run one ``UPDATE … RETURNING`` and log its event in the same transaction."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _EVENTS_LOCK)
            before = None
            if old_hash:
                before = await conn.fetchval("SELECT key_hash FROM api_keys WHERE id = $1 FOR UPDATE", args[0])
            row = await conn.fetchrow(sql, *args)
            if row is None:
                return None
            record = record_from_row(row)
            await conn.execute("INSERT INTO key_events (key_id, key_hash, kind, at) VALUES ($1,$2,$3,$4)",
                               record.id, before or record.key_hash, kind, at)
        return record

    async def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        return await self._change(
            f"UPDATE api_keys SET revoked_at = LEAST(COALESCE(revoked_at, $2), $2) WHERE id = $1 "
            f"RETURNING {_COLUMNS}", (key_id, at), "revoke", at,
        )

    async def rotate(self, key_id: str, *, key_hash: str, prefix: str, at: float) -> KeyRecord | None:
        return await self._change(
            f"UPDATE api_keys SET key_hash = $2, prefix = $3 WHERE id = $1 RETURNING {_COLUMNS}",
            (key_id, key_hash, prefix), "rotate", at, old_hash=True,
        )

    async def update(self, key_id: str, changes: Mapping[str, Any], at: float) -> KeyRecord | None:
        params = update_params(changes)
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(params, start=2)) or "id = id"
        return await self._change(f"UPDATE api_keys SET {sets} WHERE id = $1 RETURNING {_COLUMNS}",
                                  (key_id, *params.values()), "update", at)

    async def events_since(self, seq: int, *, limit: int = 1000) -> list[KeyEvent]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT seq, key_id, key_hash, kind, at FROM key_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                seq, limit,
            )
        return [_event(r) for r in rows]

    async def last_event_seq(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM key_events"))

    async def rotated_away(self, key_hash: str) -> KeyEvent | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT seq, key_id, key_hash, kind, at FROM key_events WHERE key_hash = $1 AND kind = 'rotate' "
                "ORDER BY seq DESC LIMIT 1", key_hash,
            )
        return _event(row) if row is not None else None

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        async with self._conn() as conn:
            await conn.executemany(_UPSERT_USAGE, _usage_params(rows))

    @staticmethod
    async def _marks(conn: Any, writers: Sequence[str], *, lock: bool = False) -> dict[str, int]:
        sql = "SELECT writer, applied_seq FROM usage_journal WHERE writer = ANY($1::text[])"
        rows = await conn.fetch(sql + (" FOR UPDATE" if lock else ""), list(writers))
        return {r["writer"]: int(r["applied_seq"]) for r in rows}

    async def apply_journal(self, segments: Sequence[JournalSegment]) -> int:
        if not segments:
            return 0
        writers = sorted({s.writer for s in segments})
        async with self._conn() as conn, conn.transaction():
            # Two replayers of one writer must not both see the old mark: create the rows, then lock them.
            await conn.executemany(
                "INSERT INTO usage_journal (writer, applied_seq, updated_at) VALUES ($1, 0, $2) "
                "ON CONFLICT (writer) DO NOTHING", [(w, time.time()) for w in writers],
            )
            fresh = new_segments(segments, await self._marks(conn, writers, lock=True))
            if fresh:
                await conn.executemany(_UPSERT_USAGE, _usage_params(merge_rows(fresh)))
                last: dict[str, int] = {}
                for seg in fresh:
                    last[seg.writer] = max(last.get(seg.writer, 0), seg.seq)
                await conn.executemany(
                    "UPDATE usage_journal SET applied_seq = GREATEST(applied_seq, $2), updated_at = $3 "
                    "WHERE writer = $1", [(w, s, time.time()) for w, s in last.items()],
                )
        return len(fresh)

    async def journal_marks(self, writers: Sequence[str]) -> dict[str, int]:
        async with self._conn() as conn:
            return await self._marks(conn, writers)

    @staticmethod
    async def _usage(conn: Any, key_id: str | None, since: date | None, until: date | None) -> list[UsageRow]:
        rows = await conn.fetch(
            "SELECT key_id, model, day, requests, tokens, cached_tokens FROM key_usage "
            "WHERE ($1::text IS NULL OR key_id = $1) AND ($2::date IS NULL OR day >= $2) "
            "AND ($3::date IS NULL OR day <= $3) ORDER BY day, key_id, model",
            key_id, since, until,
        )
        return [UsageRow(r["key_id"], r["model"], r["day"], int(r["requests"]), int(r["tokens"]),
                         int(r["cached_tokens"])) for r in rows]

    async def usage(
        self, *, key_id: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        async with self._conn() as conn:
            return await self._usage(conn, key_id, since, until)

    async def usage_with_marks(
        self, writers: Sequence[str], *, key_id: str | None = None, since: date | None = None,
        until: date | None = None,
    ) -> tuple[list[UsageRow], dict[str, int]]:
        async with self._conn() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            marks = await self._marks(conn, writers)
            rows = await self._usage(conn, key_id, since, until)
        return rows, marks

    async def tokens_since(self, key_id: str, since: date) -> int:
        async with self._conn() as conn:
            value = await conn.fetchval(
                "SELECT COALESCE(SUM(tokens), 0) FROM key_usage WHERE key_id = $1 AND day >= $2", key_id, since
            )
        return int(value)
