"""PostgreSQL stopped for 10 s under load: cached keys keep serving, usage is buffered and none is lost."""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings
from tests.support.required import unavailable
from tests.support.services import ThrowawayPostgres

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]
OUTAGE_S = 10.0


def _halt(pg: ThrowawayPostgres) -> None:
    """Stop the server but keep its data directory (ThrowawayPostgres.stop deletes it)."""
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pg.server.pgdata, user=pg.server.system_user)


def _resume(pg: ThrowawayPostgres) -> None:
    pg.server.ensure_postgres_running()  # same data dir, same unix socket: same URL


async def test_usage_survives_a_10s_database_outage_under_load(tmp_path: Path) -> None:
    # Not under pytest's tmp root: PostgreSQL runs as another user (pgserver, when we are root) and
    # any concurrent pytest run resets that root to 0700, locking the server out of its own files.
    pg_dir = Path(tempfile.mkdtemp(prefix="gazsi-pg-"))
    pg = ThrowawayPostgres(pg_dir / "pg")
    try:
        pg.start()
    except Exception as exc:
        unavailable(f"PostgreSQL unavailable: {exc!r}")
    settings = load_settings(
        data_dir=str(tmp_path), engine={"backend": "fake"}, edge={"dataplane": "asgi", "port": 0},
        # The in-process key cache must outlive the outage for cached keys to keep working.
        auth={"database_url": pg.url, "key_env": "test", "cache_ttl_s": 120, "usage_flush_interval_s": 0.2},
    )
    authorizer = build_authorizer(settings)
    node = EdgeNode(settings, engine=FakeEngine(), authorizer=authorizer)
    await node.start()
    assert node.runtime is not None
    await node.runtime.wait_loaded()
    sent: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])  # key id -> [requests, tokens]
    failures: list[int] = []
    try:
        keys = [await authorizer.admin.create(name=f"k{i}") for i in range(3)]
        async with httpx.AsyncClient(base_url=node.url) as client:
            stop = asyncio.Event()

            async def load(i: int) -> None:
                key = keys[i % len(keys)]
                n = 0
                while not stop.is_set():
                    n += 1
                    r = await client.post("/v1/embeddings", json={"input": f"text {i} {n}", "model": "all-MiniLM-L6-v2"},
                                          headers={"Authorization": f"Bearer {key.key}"})
                    if r.status_code == 200:
                        sent[key.record.id][0] += 1
                        sent[key.record.id][1] += r.json()["usage"]["prompt_tokens"]
                    else:
                        failures.append(r.status_code)
                    await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(load(i)) for i in range(6)]
            await asyncio.sleep(1.5)
            await asyncio.to_thread(_halt, pg)
            halted_at = time.monotonic()
            before = sum(v[0] for v in sent.values())
            await asyncio.sleep(OUTAGE_S)
            during = sum(v[0] for v in sent.values()) - before
            pending_in_outage = authorizer.usage.pending()
            status_in_outage = authorizer.status()
            await asyncio.to_thread(_resume, pg)
            outage_s = time.monotonic() - halted_at
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*tasks)
        assert outage_s >= OUTAGE_S
        assert failures == []  # cached keys kept working through the outage
        assert during > 0 and pending_in_outage > 0
        assert authorizer.metrics.usage_flushes.labels("error")._value.get() > 0  # flushes did fail meanwhile
        assert authorizer.usage.dropped == 0
        assert status_in_outage["usage_pending_rows"] > 0
        # Everything buffered is written once the database is back: compare exact counts.
        for _ in range(100):
            if await authorizer.usage.flush() and authorizer.usage.pending() == 0:
                break
            await asyncio.sleep(0.1)
        stored = {row.key_id: [row.requests, row.tokens] for row in await authorizer.store.usage()}
        assert stored == dict(sent)
    finally:
        await node.stop()
        pg.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)
