"""PostgreSQL key store through an asyncpg pool; migrations under an advisory lock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import date

import asyncpg

from gazsi_cluster.auth.keys import KeyRecord, UsageRow
from gazsi_cluster.auth.store import load_migrations, record_from_row, record_params
from gazsi_cluster.errors import ServiceUnavailable

__all__ = ["PostgresKeyStore"]

_COLUMNS = ("id, name, owner, prefix, key_hash, scopes, created_at, expires_at, revoked_at, rpm, tpm, "
            "monthly_quota")
# Any fixed number shared by every GAZSI process: serialises concurrent migrators.
_MIGRATION_LOCK = 0x6A2E51
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
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
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

    async def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        return await self._one(
            f"UPDATE api_keys SET revoked_at = LEAST(COALESCE(revoked_at, $2), $2) WHERE id = $1 "
            f"RETURNING {_COLUMNS}", key_id, at,
        )

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        async with self._conn() as conn:
            await conn.executemany(
                "INSERT INTO key_usage AS u (key_id, model, day, requests, tokens) VALUES ($1,$2,$3,$4,$5) "
                "ON CONFLICT (key_id, model, day) DO UPDATE SET requests = u.requests + excluded.requests, "
                "tokens = u.tokens + excluded.tokens",
                [(r.key_id, r.model, r.day, r.requests, r.tokens) for r in rows],
            )

    async def usage(
        self, *, key_id: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT key_id, model, day, requests, tokens FROM key_usage WHERE ($1::text IS NULL OR key_id = $1) "
                "AND ($2::date IS NULL OR day >= $2) AND ($3::date IS NULL OR day <= $3) ORDER BY day, key_id, model",
                key_id, since, until,
            )
        return [UsageRow(r["key_id"], r["model"], r["day"], int(r["requests"]), int(r["tokens"])) for r in rows]

    async def tokens_since(self, key_id: str, since: date) -> int:
        async with self._conn() as conn:
            value = await conn.fetchval(
                "SELECT COALESCE(SUM(tokens), 0) FROM key_usage WHERE key_id = $1 AND day >= $2", key_id, since
            )
        return int(value)
