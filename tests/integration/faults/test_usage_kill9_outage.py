"""``kill -9`` of an edge during a PostgreSQL outage loses no usage it had answered.

A real ``gazsi edge serve`` process (fake engine, real pipeline and authorizer) serves clients on
three keys; PostgreSQL is stopped (``pg_ctl stop``, data kept); the edge keeps answering from its
key cache and journals every answered request's usage; midway through the outage it is killed
with SIGKILL. PostgreSQL comes back, a new edge process starts on the same data directory, finds
the dead process's journal (its lock is free) and replays it. ``gazsi keys usage`` then shows
exactly the requests and tokens the clients were answered: lost = 0, nothing counted twice.

``GAZSI_TEST_OUTAGE_S`` sets the outage (default 12 s; docs/reliability.md records a 30 s run).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from gazsi_cluster.auth.admin import KeyAdmin
from gazsi_cluster.auth.factory import open_store
from tests.support.required import unavailable
from tests.support.services import ThrowawayPostgres, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[3]
OUTAGE_S = float(os.environ.get("GAZSI_TEST_OUTAGE_S", "12"))
MODEL = "all-MiniLM-L6-v2"


def _halt(pg: ThrowawayPostgres) -> None:
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pg.server.pgdata, user=pg.server.system_user)


def _resume(pg: ThrowawayPostgres) -> None:
    pg.server.ensure_postgres_running()


def edge_env(pg_url: str) -> dict[str, str]:
    return dict(os.environ, GAZSI_AUTH__DATABASE_URL=pg_url, GAZSI_AUTH__KEY_ENV="test",
                # Keys stay trusted in-process through the outage (the store cannot be asked).
                GAZSI_AUTH__CACHE_TTL_S="600", GAZSI_AUTH__USAGE_FLUSH_INTERVAL_S="0.5")


def start_edge(data_dir: Path, pg_url: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve", "--port", str(port),
             "--backend", "fake", "--data-dir", str(data_dir)],
            cwd=ROOT, env=edge_env(pg_url), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"edge did not become ready: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def keys_usage(data_dir: Path, pg_url: str) -> dict[str, tuple[int, int]]:
    out = subprocess.run([sys.executable, "-m", "gazsi_cli.main", "keys", "--data-dir", str(data_dir), "--json",
                          "usage"], cwd=ROOT, env=edge_env(pg_url), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    totals: dict[str, tuple[int, int]] = {}
    for row in json.loads(out.stdout):
        req, tok = totals.get(row["key_id"], (0, 0))
        totals[row["key_id"]] = (req + row["requests"], tok + row["tokens"])
    return totals


async def test_kill9_during_a_database_outage_loses_no_answered_usage(tmp_path: Path) -> None:
    # Not under pytest's tmp root: PostgreSQL runs as another user (pgserver, when we are root) and
    # any concurrent pytest run resets that root to 0700, locking the server out of its own files.
    pg_dir = Path(tempfile.mkdtemp(prefix="gazsi-pg-"))
    pg = ThrowawayPostgres(pg_dir / "pg")
    try:
        pg.start()
    except Exception as exc:
        unavailable(f"PostgreSQL unavailable: {exc!r}")
    data_dir, log = tmp_path / "data", tmp_path / "edges.log"
    edges: list[subprocess.Popen[bytes]] = []
    try:
        store = open_store(pg.url, data_dir)
        await store.start()
        keys = [await KeyAdmin(store, env="test").create(name=f"k{i}") for i in range(3)]
        await store.close()
        edge_a, port = await asyncio.to_thread(start_edge, data_dir, pg.url, log)
        edges.append(edge_a)

        served: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        during = [0]
        outage = asyncio.Event()
        stop = asyncio.Event()
        n = [0]

        async def client(i: int) -> None:
            key = keys[i % len(keys)]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
                while not stop.is_set():
                    n[0] += 1
                    try:
                        r = await c.post("/v1/embeddings", json={"model": MODEL, "input": f"unique {i} {n[0]}"},
                                         headers={"Authorization": f"Bearer {key.key}"})
                    except httpx.HTTPError:
                        await asyncio.sleep(0.05)  # the edge is gone: nothing answered, nothing to bill
                        continue
                    assert r.status_code == 200, r.text
                    served[key.record.id][0] += 1
                    served[key.record.id][1] += r.json()["usage"]["prompt_tokens"]
                    during[0] += outage.is_set()
                    await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(client(i)) for i in range(6)]
        await asyncio.sleep(2.0)
        await asyncio.to_thread(_halt, pg)
        halted = time.monotonic()
        outage.set()
        await asyncio.sleep(OUTAGE_S / 2)
        os.kill(edge_a.pid, signal.SIGKILL)  # kill -9 mid-outage: no flush, no close
        edge_a.wait(10)
        stop.set()
        await asyncio.gather(*tasks)
        journal_files = sorted(p.name for p in (data_dir / "usage-journal").rglob("*") if p.is_file())
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - halted)))
        await asyncio.to_thread(_resume, pg)
        outage_s = time.monotonic() - halted

        edge_b, _ = await asyncio.to_thread(start_edge, data_dir, pg.url, log)  # replays A's journal
        edges.append(edge_b)
        expected = {k: (v[0], v[1]) for k, v in served.items()}
        deadline = time.monotonic() + 30
        while (got := await asyncio.to_thread(keys_usage, data_dir, pg.url)) != expected:
            assert time.monotonic() < deadline, (got, expected)
            await asyncio.sleep(0.5)
        # Replayed, not read through: the dead writer's files are gone once the store has them.
        leftover = [p.name for p in (data_dir / "usage-journal").rglob("*.jsonl")]
        answered = sum(v[0] for v in expected.values())
        print(f"\noutage {outage_s:.1f}s; answered {answered} ({during[0]} during the outage); "
              f"edge killed with SIGKILL at {OUTAGE_S / 2:.1f}s; journal files then: {len(journal_files)}; "
              f"stored after replay: {sum(v[0] for v in got.values())}; lost: {answered - sum(v[0] for v in got.values())}")
        assert edge_a.returncode == -signal.SIGKILL
        assert outage_s >= OUTAGE_S and during[0] > 0
        assert any(name.endswith(".lock") for name in journal_files)  # A's journal was on disk, locked
        assert not any(name.startswith(f"{edge_a.pid}") for name in leftover)
    finally:
        for proc in edges:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        pg.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)
