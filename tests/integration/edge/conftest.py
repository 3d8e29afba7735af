from __future__ import annotations

import asyncio
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def edge_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per session, so the ONNX export (seconds) happens once."""
    return tmp_path_factory.mktemp("gazsi-data")


async def wait_ready(client, limit_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while asyncio.get_running_loop().time() < deadline:
        r = await client.get("/readyz")
        if r.status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"edge not ready: {r.text}")
