"""Service fixtures any test may use: throwaway PostgreSQL and Redis (never the machine's own).

Without the binaries a test skips, unless ``GAZSI_REQUIRE_SERVICES=1`` (CI), where it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ray_env import fresh_home_env
from tests.support.required import unavailable
from tests.support.services import ThrowawayPostgres, ThrowawayRedis

# The whole run gets HOME (and the XDG dirs) of its own, before any test is collected: no test reads or
# writes the user's ~/.ray or data directory, not even the guard below. Tests that start Ray still give
# each run a HOME of its own (fresh_home_env), so none can lean on a token another left in this one.
# Downloaded tools (helm) stay cached where the user keeps caches. An inner run a test started in a HOME
# it made (GAZSI_TEST_OWN_HOME=1) keeps that one.
if os.environ.get("GAZSI_TEST_OWN_HOME") != "1":
    os.environ.setdefault("GAZSI_TEST_TOOL_CACHE",
                          os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"))
    _session = fresh_home_env()
    del _session["GAZSI_TEST_OWN_HOME"]  # each Ray-starting test must still make its own (require_own_home)
    os.environ.clear()
    os.environ.update(_session)


def _service_missing(what: str, exc: BaseException) -> None:
    unavailable(f"{what} unavailable: {exc!r} (pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayPostgres]:
    """One throwaway PostgreSQL per session (pgserver, unix socket)."""
    server = ThrowawayPostgres(tmp_path_factory.mktemp("pg"))
    try:
        server.start()
    except Exception as exc:
        _service_missing("PostgreSQL", exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: ThrowawayPostgres) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    """A throwaway redis-server on a free loopback port; tests may ``stop()`` it to simulate an outage."""
    server = ThrowawayRedis(tmp_path / "redis")
    try:
        server.start()
    except Exception as exc:
        _service_missing("Redis", exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: ThrowawayRedis) -> str:
    return redis_server.url


@pytest.fixture(scope="session", autouse=True)
def _users_ray_dir_untouched() -> Iterator[None]:
    """Fail the run if any test wrote to the run's ``~/.ray``: a test that starts Ray without a HOME of its
    own (tests/support/ray_env.py) would leave a token there for later tests to lean on."""
    def snapshot() -> dict[str, float]:
        root = Path.home() / ".ray"
        return {str(p): p.stat().st_mtime for p in root.rglob("*")} if root.exists() else {}

    if os.environ.get("GAZSI_TEST_OWN_HOME") == "1":  # an inner run whose HOME a test made for it
        yield
        return
    before = snapshot()
    yield
    after = snapshot()
    assert after == before, f"a test wrote to ~/.ray: {sorted(set(after.items()) ^ set(before.items()))}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``fresh_machine`` tests run first (no earlier test can leave them anything to lean on);
    tests marked ``netns_inner`` run only when their outer test re-runs them inside ``unshare -n``."""
    items.sort(key=lambda item: item.get_closest_marker("fresh_machine") is None)  # stable: order kept
    if os.environ.get("GAZSI_TEST_IN_NETNS") == "1":
        return
    inner = [item for item in items if item.get_closest_marker("netns_inner")]
    if inner:
        config.hook.pytest_deselected(items=inner)
        items[:] = [item for item in items if not item.get_closest_marker("netns_inner")]
