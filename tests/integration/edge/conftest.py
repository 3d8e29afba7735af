from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gazsi_cluster.model import load_model_spec


@pytest.fixture(scope="session")
def edge_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per session, so the ONNX export (seconds) happens once."""
    return tmp_path_factory.mktemp("gazsi-data")


@pytest.fixture(scope="session")
def reference_model():
    """sentence-transformers on the CPU, the ground truth for every engine."""
    from sentence_transformers import SentenceTransformer

    spec = load_model_spec("all-MiniLM-L6-v2")
    return SentenceTransformer(str(spec.path), device="cpu")


async def wait_ready(client, limit_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while asyncio.get_running_loop().time() < deadline:
        r = await client.get("/readyz")
        if r.status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"edge not ready: {r.text}")
