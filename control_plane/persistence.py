"""Persistence of node events and heartbeat samples, batched off the hot path.

The registry calls ``event``/``sample`` synchronously; they only append to bounded buffers.
A background task flushes the buffers every ``flush_s`` (as GPUFabric's consumer does, minus
Kafka). :class:`PostgresStore` writes with COPY / executemany through asyncpg;
:class:`MemoryStore` keeps recent rows in memory (embedded mode). ``load_nodes`` returns the
node list to restore after a control-plane restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import deque
from typing import Any

from control_plane.registry import NodeEvent
from control_plane.state import NodeRecord, NodeState
from gazsi_cluster.errors import ServiceUnavailable
from gazsi_cluster.protocol import NodeFacts, NodeLoad

__all__ = ["MemoryStore", "PostgresStore", "Store"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cp_nodes (
    node_id text PRIMARY KEY, facts jsonb NOT NULL, state text NOT NULL, weight integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS cp_events (
    id bigserial PRIMARY KEY, node_id text NOT NULL, at timestamptz NOT NULL, kind text NOT NULL,
    state text NOT NULL, detail text NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS cp_heartbeats (node_id text NOT NULL, at timestamptz NOT NULL, load jsonb NOT NULL);
CREATE INDEX IF NOT EXISTS cp_heartbeats_node_at ON cp_heartbeats (node_id, at);
"""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Store:
    """Buffers shared by both stores; subclasses implement ``_write`` and ``load_nodes``."""

    def __init__(self, *, flush_s: float = 0.5, max_buffer: int = 200_000) -> None:
        self.flush_s = flush_s
        self.events: deque[tuple[dt.datetime, NodeEvent]] = deque()
        self.samples: deque[tuple[str, dt.datetime, str]] = deque(maxlen=max_buffer)
        self.node_rows: dict[str, tuple[str, str, str, int] | None] = {}  # latest per node; None = delete
        self.dropped = 0
        self.written_samples = 0
        self._task: asyncio.Task[None] | None = None

    # -- RegistrySink (synchronous, never blocks) ----------------------------------------------
    def event(self, event: NodeEvent, record: NodeRecord) -> None:
        self.events.append((_utcnow(), event))
        if event.kind == "removed":
            self.node_rows[record.node_id] = None
        else:
            self.node_rows[record.node_id] = (
                record.node_id, record.facts.model_dump_json(), record.state.value, record.weight)

    def sample(self, node_id: str, load: NodeLoad) -> None:
        if len(self.samples) == self.samples.maxlen:
            self.dropped += 1  # the database is behind: lose the oldest samples, not the registry
        self.samples.append((node_id, _utcnow(), load.model_dump_json()))

    # -- flushing ------------------------------------------------------------------------------
    async def flush(self) -> None:
        events, self.events = list(self.events), deque()
        samples = list(self.samples)
        self.samples.clear()
        nodes, self.node_rows = self.node_rows, {}
        if events or samples or nodes:
            await self._write(events, samples, nodes)
            self.written_samples += len(samples)

    async def _write(self, events: list[tuple[dt.datetime, NodeEvent]], samples: list[tuple[str, dt.datetime, str]],
                     nodes: dict[str, tuple[str, str, str, int] | None]) -> None:
        raise NotImplementedError

    async def load_nodes(self) -> list[NodeRecord]:
        return []

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("persisting control-plane data failed; will retry with new data")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gazsi-cp-persist")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()


class MemoryStore(Store):
    """Embedded mode: the last rows in memory, for `gazsi nodes show` and tests."""

    def __init__(self, *, keep: int = 10_000, **kw: Any) -> None:
        super().__init__(**kw)
        self.kept_events: deque[tuple[dt.datetime, NodeEvent]] = deque(maxlen=keep)
        self.kept_samples: deque[tuple[str, dt.datetime, str]] = deque(maxlen=keep)
        self.kept_nodes: dict[str, tuple[str, str, str, int]] = {}

    async def _write(self, events: list[tuple[dt.datetime, NodeEvent]], samples: list[tuple[str, dt.datetime, str]],
                     nodes: dict[str, tuple[str, str, str, int] | None]) -> None:
        self.kept_events.extend(events)
        self.kept_samples.extend(samples)
        for node_id, row in nodes.items():
            if row is None:
                self.kept_nodes.pop(node_id, None)
            else:
                self.kept_nodes[node_id] = row


def _record(node_id: str, facts: str, state: str, weight: int) -> NodeRecord:
    return NodeRecord(node_id, NodeFacts.model_validate_json(facts), 0.0, 0.0, NodeState(state), weight=weight)


class PostgresStore(Store):
    def __init__(self, dsn: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.dsn = dsn
        self._pool: Any = None

    async def start(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, command_timeout=30)
            async with self._pool.acquire() as conn:
                await conn.execute(SCHEMA)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ServiceUnavailable(f"control plane database unreachable: {exc}") from exc
        await super().start()

    async def close(self) -> None:
        await super().close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _write(self, events: list[tuple[dt.datetime, NodeEvent]], samples: list[tuple[str, dt.datetime, str]],
                     nodes: dict[str, tuple[str, str, str, int] | None]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            upserts = [row for row in nodes.values() if row is not None]
            deletes = [(k,) for k, row in nodes.items() if row is None]
            if upserts:
                await conn.executemany(
                    "INSERT INTO cp_nodes (node_id, facts, state, weight) VALUES ($1, $2::jsonb, $3, $4) "
                    "ON CONFLICT (node_id) DO UPDATE SET facts = EXCLUDED.facts, state = EXCLUDED.state, "
                    "weight = EXCLUDED.weight, updated_at = now()", upserts)
            if deletes:
                await conn.executemany("DELETE FROM cp_nodes WHERE node_id = $1", deletes)
            if events:
                await conn.copy_records_to_table(
                    "cp_events", columns=["node_id", "at", "kind", "state", "detail"],
                    records=[(e.node_id, at, e.kind, e.state, e.detail) for at, e in events])
            if samples:
                # COPY sends jsonb as text in the text format: fine for asyncpg's record encoder.
                await conn.copy_records_to_table("cp_heartbeats", columns=["node_id", "at", "load"],
                                                 records=samples)

    async def load_nodes(self) -> list[NodeRecord]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT node_id, facts::text AS facts, state, weight FROM cp_nodes")
        return [_record(r["node_id"], r["facts"], r["state"], r["weight"]) for r in rows]

    async def count(self, table: str) -> int:
        if table not in ("cp_nodes", "cp_events", "cp_heartbeats"):
            raise ValueError(table)
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
