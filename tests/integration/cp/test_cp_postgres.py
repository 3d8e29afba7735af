"""Heartbeat samples and node events in a real (throwaway) PostgreSQL; recovery after restart."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from control_plane.persistence import PostgresStore
from control_plane.service import ControlPlane
from control_plane.state import NodeState
from gazsi_cluster.config import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_persist_and_recover_node_list(pg_dsn: str, tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path), control_plane={"database_url": pg_dsn})
    store = PostgresStore(pg_dsn, flush_s=0.05)
    cp = ControlPlane(settings, store=store)
    await cp.start()
    names = [f"pg-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    base_hb = await store.count("cp_heartbeats")
    for i, name in enumerate(names):
        cp.join({"node_id": name, "address": "127.0.0.1", "port": 9000 + i, "engine_backend": "fake",
                 "models": ["m"], "max_batch_size": 8, "version": "t"}, None)
        for _ in range(4):
            cp.heartbeat(name, {"queue_depth": i})
    cp.remove(names[2])
    await store.flush()
    assert await store.count("cp_heartbeats") - base_hb == 12
    assert await store.count("cp_events") >= 3 + 3 + 1  # joined, joining->healthy, removed
    await cp.stop()

    # A new control plane (restart) finds the live nodes and routes to them at once.
    cp2 = ControlPlane(settings, store=PostgresStore(pg_dsn))
    await cp2.start()
    try:
        assert {names[0], names[1]} <= set(cp2.table.by_id)
        assert names[2] not in cp2.registry.nodes
        assert cp2.registry.nodes[names[0]].state is NodeState.HEALTHY
        cp2.heartbeat(names[0], {})  # heartbeats continue without a re-join (same CA, same ids)
    finally:
        await cp2.stop()


async def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    from gazsi_cluster.errors import ServiceUnavailable

    dsn = "postgresql://nobody@127.0.0.1:1/none"
    cp = ControlPlane(load_settings(data_dir=str(tmp_path)), store=PostgresStore(dsn))
    with pytest.raises(ServiceUnavailable, match="database unreachable"):
        await cp.start()
