"""Auth with a real (throwaway) Redis: revocation fan-out, Redis outage, cluster-wide rate limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gazsi_cluster.auth.factory import build_authorizer, open_store
from gazsi_cluster.config import Settings, load_settings
from gazsi_cluster.errors import AuthenticationError
from tests.support.auth_hammer import run_hammers
from tests.support.services import ThrowawayRedis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def settings_for(data_dir: Path, redis_url: str, db_url: str | None = None) -> Settings:
    return load_settings(data_dir=str(data_dir), auth={"redis_url": redis_url, "database_url": db_url,
                                                      "key_env": "test", "cache_ttl_s": 30})


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("postgres_url") if request.param == "postgres" else None


@pytest.fixture
async def two_nodes(tmp_path: Path, redis_url: str, database_url: str | None) -> AsyncIterator[list[Any]]:
    nodes = [build_authorizer(settings_for(tmp_path, redis_url, database_url)) for _ in range(2)]
    for n in nodes:
        await n.start()
    for n in nodes:
        await asyncio.wait_for(n.subscribed.wait(), 5)
    try:
        yield nodes
    finally:
        for n in nodes:
            await n.close()


async def test_revocation_reaches_every_process_within_1s(two_nodes: list[Any]) -> None:
    a, b = two_nodes
    new = await a.admin.create(name="shared")
    header = f"Bearer {new.key}"
    await a.authorize(header)
    await b.authorize(header)  # both now hold it in their in-process cache (30 s TTL)
    assert len(b.local) == 1
    started = time.monotonic()
    await a.admin.revoke(new.record.id)
    while True:
        try:
            await b.authorize(header)
        except AuthenticationError:
            break
        assert time.monotonic() - started < 1.0, "revocation did not reach the other process within 1 s"
        await asyncio.sleep(0.005)
    with pytest.raises(AuthenticationError, match="revoked"):
        await a.authorize(header)


async def test_second_process_reads_the_redis_tier(two_nodes: list[Any]) -> None:
    a, b = two_nodes
    new = await a.admin.create(name="tiered")
    await a.authorize(f"Bearer {new.key}")
    await b.authorize(f"Bearer {new.key}")
    assert b.metrics.lookups.labels("redis")._value.get() == 1
    assert b.metrics.lookups.labels("database")._value.get() == 0


async def test_redis_down_falls_back_to_database_and_says_degraded(
    tmp_path: Path, redis_server: ThrowawayRedis
) -> None:
    auth = build_authorizer(settings_for(tmp_path, redis_server.url))
    await auth.start()
    try:
        new = await auth.admin.create(name="k", rpm=100)
        assert (await auth.authorize(f"Bearer {new.key}")).key_id == new.record.id
        assert auth.status()["redis"] == "ok"
        redis_server.stop()
        auth.local.clear()  # force a lookup: the database answers instead of Redis
        assert (await auth.authorize(f"Bearer {new.key}")).key_id == new.record.id
        status = auth.status()
        assert status["redis"] == "degraded" and status["degraded"] is True
        assert auth.metrics.degraded.labels("redis")._value.get() == 1
        assert auth.metrics.lookups.labels("database")._value.get() == 2
    finally:
        await auth.close()


@pytest.mark.slow
async def test_rate_limit_holds_across_processes(tmp_path: Path, redis_url: str) -> None:
    rpm, procs, seconds = 600, 4, 3.0
    admin_auth = build_authorizer(settings_for(tmp_path, redis_url))
    await admin_auth.start()
    new = await admin_auth.admin.create(name="hammered", rpm=rpm)
    await admin_auth.close()
    results = await run_hammers([{"data_dir": str(tmp_path), "redis_url": redis_url, "key": new.key,
                                  "seconds": seconds, "seed": i} for i in range(procs)])
    allowed = sum(r["ok"] for r in results)
    # A full bucket (rpm) plus the refill over the window (rpm/60 per second).
    expected = rpm + rpm / 60.0 * seconds
    assert sum(r["limited"] for r in results) > 0, "the processes never hit the limit; the test proves nothing"
    assert all(r["ok"] > 0 for r in results)
    assert abs(allowed - expected) / expected < 0.05, (allowed, expected, results)


async def test_store_for_cli_sees_the_same_keys(tmp_path: Path, redis_url: str) -> None:
    auth = build_authorizer(settings_for(tmp_path, redis_url))
    await auth.start()
    try:
        new = await auth.admin.create(name="seen")
        store = open_store(None, tmp_path)
        await store.start()
        assert (await store.find(new.record.prefix)) == new.record
        await store.close()
    finally:
        await auth.close()
