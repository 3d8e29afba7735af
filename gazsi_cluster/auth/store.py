"""The key store contract, shared by the PostgreSQL and embedded SQLite backends.

Both backends keep the same schema (``migrations/<backend>/NNNN_*.sql``, applied in order and
recorded in ``schema_migrations`` so a restart applies nothing twice) and raise
:class:`~gazsi_cluster.errors.ServiceUnavailable` when the database cannot be reached, so
callers never confuse "database down" with "key unknown".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gazsi_cluster.auth.keys import KeyRecord, UsageRow

__all__ = [
    "UPDATABLE",
    "JournalSegment",
    "KeyEvent",
    "KeyStore",
    "load_migrations",
    "record_from_row",
    "store_fingerprint",
]

# Fields ``KeyStore.update`` may change (the secret changes only through ``rotate``).
UPDATABLE = frozenset({"name", "owner", "scopes", "expires_at", "rpm", "tpm", "monthly_quota", "daily_quota"})


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A change every running process must apply to its key cache (row of ``key_events``)."""

    seq: int
    key_id: str
    key_hash: str  # the hash to evict; for a rotation, the old secret's
    kind: str  # "revoke" | "rotate" | "update"
    at: float


@dataclass(frozen=True, slots=True)
class JournalSegment:
    """One sealed file of a usage journal: ``writer``'s segment number ``seq`` and its rows."""

    writer: str
    seq: int
    rows: tuple[UsageRow, ...]


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
        """Mark revoked (keeps an earlier revocation time) and log a ``revoke`` event; the updated
        record, or None if unknown."""

    async def rotate(self, key_id: str, *, key_hash: str, prefix: str, at: float) -> KeyRecord | None:
        """Give the key a new secret (same id, so usage and limit windows carry over) and log a
        ``rotate`` event naming the old hash; the updated record, or None if unknown."""

    async def update(self, key_id: str, changes: Mapping[str, Any], at: float) -> KeyRecord | None:
        """Change fields in :data:`UPDATABLE` and log an ``update`` event; None if unknown."""

    async def events_since(self, seq: int, *, limit: int = 1000) -> list[KeyEvent]:
        """Events after ``seq``, oldest first (one indexed range query: every process polls it)."""

    async def last_event_seq(self) -> int: ...

    async def rotated_away(self, key_hash: str) -> KeyEvent | None:
        """The rotation that retired ``key_hash``, if it was a key's old secret."""

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add counts to the (key, model, day) rows, creating them as needed."""

    async def apply_journal(self, segments: Sequence[JournalSegment]) -> int:
        """Add the rows of each segment not applied before, and advance its writer's mark, in one
        transaction (a segment is counted exactly once however often it is offered); returns how
        many segments were new."""

    async def journal_marks(self, writers: Sequence[str]) -> dict[str, int]:
        """``writer -> applied_seq`` for the writers that have one."""

    async def usage(
        self, *, key_id: str | None = None, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]: ...

    async def usage_with_marks(
        self, writers: Sequence[str], *, key_id: str | None = None, since: date | None = None,
        until: date | None = None,
    ) -> tuple[list[UsageRow], dict[str, int]]:
        """:meth:`usage` and :meth:`journal_marks` from one snapshot (so journal files not yet applied
        can be added without counting any twice)."""

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
        rpm=row["rpm"], tpm=row["tpm"], monthly_quota=row["monthly_quota"], daily_quota=row["daily_quota"],
    )


COLUMNS = ("id, name, owner, prefix, key_hash, scopes, created_at, expires_at, revoked_at, rpm, tpm, "
           "monthly_quota, daily_quota")


def record_params(r: KeyRecord) -> tuple[Any, ...]:
    return (r.id, r.name, r.owner, r.prefix, r.key_hash, json.dumps(list(r.scopes)), r.created_at,
            r.expires_at, r.revoked_at, r.rpm, r.tpm, r.monthly_quota, r.daily_quota)


def update_params(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` checked against :data:`UPDATABLE`, with scopes serialised as the column holds them."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    return {k: (json.dumps(list(v)) if k == "scopes" else v) for k, v in changes.items()}


def new_segments(segments: Sequence[JournalSegment], marks: Mapping[str, int]) -> list[JournalSegment]:
    """The segments past their writer's mark (the ones a transaction must still add)."""
    return [s for s in segments if s.seq > marks.get(s.writer, 0)]


def merge_rows(segments: Sequence[JournalSegment]) -> list[UsageRow]:
    """Rows of ``segments`` summed per (key, model, day)."""
    acc: dict[tuple[str, str, date], list[int]] = {}
    for seg in segments:
        for r in seg.rows:
            slot = acc.setdefault((r.key_id, r.model, r.day), [0, 0, 0])
            slot[0] += r.requests
            slot[1] += r.tokens
            slot[2] += r.cached_tokens
    return [UsageRow(k, m, d, v[0], v[1], v[2]) for (k, m, d), v in acc.items()]


def store_fingerprint(database_url: str | None, data_dir: Path) -> str:
    """A short name for the key store the settings point at (usage journals are kept per store,
    so a journal is never replayed into another store)."""
    target = database_url or str((Path(data_dir) / "keys.sqlite3").resolve())
    return hashlib.sha256(target.encode()).hexdigest()[:12]

