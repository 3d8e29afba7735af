"""Fixtures for control-plane integration tests: settings in a temp dir, a throwaway PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gazsi_cluster.config import Settings, load_settings
from tests.support.required import unavailable


@pytest.fixture
def cp_settings(tmp_path: Path) -> Settings:
    return load_settings(
        data_dir=str(tmp_path / "data"),
        control_plane={"join_token": "join-s3cret", "admin_token": "admin-s3cret", "port": 0},
    )


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway PostgreSQL from the `pgserver` package (never the machine's own 5432)."""
    try:
        import pgserver
    except ImportError:
        unavailable("pgserver is not installed (pip install -e '.[dev]')")
    server: Any = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
