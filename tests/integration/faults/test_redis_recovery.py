"""Redis stopped and started again: auth and limits degrade to the database/in-process, then recover."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings
from tests.support.services import ThrowawayRedis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_redis_outage_degrades_then_recovers(tmp_path: Path, redis_server: ThrowawayRedis) -> None:
    settings = load_settings(data_dir=str(tmp_path), auth={"redis_url": redis_server.url, "key_env": "test",
                                                           "redis_timeout_s": 0.2})
    auth = build_authorizer(settings)
    await auth.start()
    try:
        key = await auth.admin.create(name="k", rpm=1000)
        header = f"Bearer {key.key}"
        assert (await auth.authorize(header)).key_id == key.record.id
        assert auth.status()["redis"] == "ok"
        redis_server.stop()
        for _ in range(5):  # requests keep being served while Redis is gone
            auth.local.clear()
            assert (await auth.authorize(header)).key_id == key.record.id
        assert auth.status()["redis"] == "degraded"
        redis_server.start()  # same port: the configured URL works again
        recovered = False
        for _ in range(100):
            auth.local.clear()
            assert (await auth.authorize(header)).key_id == key.record.id
            if auth.status()["redis"] == "ok":
                recovered = True
                break
            await asyncio.sleep(0.1)
        assert recovered, auth.status()
        before = auth.metrics.lookups.labels("redis")._value.get()
        auth.local.clear()
        await auth.authorize(header)
        assert auth.metrics.lookups.labels("redis")._value.get() == before + 1  # Redis tier answers again
    finally:
        await auth.close()
