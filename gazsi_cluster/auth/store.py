"""The key store contract, shared by the PostgreSQL and embedded SQLite backends.

Both backends keep the same schema (``migrations/<backend>/NNNN_*.sql``, applied in order and
recorded in ``schema_migrations`` so a restart applies nothing twice) and raise
:class:`~gazsi_cluster.errors.ServiceUnavailable` when the database cannot be reached, so
callers never confuse "database down" with "key unknown".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gazsi_cluster.auth.keys import KeyRecord, UsageRow

__all__ = ["KeyStore", "load_migrations", "open_store", "record_from_row"]


@runtime_checkable
class KeyStore(Protocol):
    """Source of truth for keys and usage. Every method may raise ``ServiceUnavailable``."""

    async def start(self) -> None:
        """Connect and apply pending migrations (idempotent)."""

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def insert(self, record: KeyRecord) -> None: ...

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    async def find(self, ident: str) -> KeyRecord | None:
        """A key by id or by display prefix."""

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        """Mark revoked (keeps an earlier revocation time); the updated record, or None if unknown."""

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add counts to the (key, model, day) rows, creating them as needed."""

    async def usage(
        self, *, key_id: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]: ...

    async def tokens_since(self, key_id: str, since: date) -> int: ...


def load_migrations(backend: str) -> list[tuple[int, str, str]]:
    """The packaged ``.sql`` files of ``backend`` ("postgres" or "sqlite"), ordered by version."""
    folder = resources.files("gazsi_cluster.auth").joinpath("migrations", backend)
    out: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            out.append((version, entry.name, entry.read_text(encoding="utf-8")))
    out.sort()
    if len({v for v, _, _ in out}) != len(out):
        raise RuntimeError(f"duplicate migration versions in {backend}")
    return out


def record_from_row(row: Any) -> KeyRecord:
    """Build a record from a DB row (mapping access works for asyncpg and sqlite3.Row)."""
    return KeyRecord(
        id=row["id"], name=row["name"], owner=row["owner"], prefix=row["prefix"], key_hash=row["key_hash"],
        scopes=tuple(json.loads(row["scopes"])), created_at=float(row["created_at"]),
        expires_at=None if row["expires_at"] is None else float(row["expires_at"]),
        revoked_at=None if row["revoked_at"] is None else float(row["revoked_at"]),
        rpm=row["rpm"], tpm=row["tpm"], monthly_quota=row["monthly_quota"],
    )


def record_params(r: KeyRecord) -> tuple[Any, ...]:
    return (r.id, r.name, r.owner, r.prefix, r.key_hash, json.dumps(list(r.scopes)), r.created_at,
            r.expires_at, r.revoked_at, r.rpm, r.tpm, r.monthly_quota)


def open_store(database_url: str | None, data_dir: Path) -> KeyStore:
    """PostgreSQL when ``database_url`` is set, else SQLite at ``<data_dir>/keys.sqlite3``."""
    if database_url:
        from gazsi_cluster.auth._postgres import PostgresKeyStore

        return PostgresKeyStore(database_url)
    from gazsi_cluster.auth._sqlite import SqliteKeyStore

    return SqliteKeyStore(Path(data_dir) / "keys.sqlite3")
