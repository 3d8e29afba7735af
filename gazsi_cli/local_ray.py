"""The local Ray head that ``gazsi up`` starts, and what protects it.

Ray 2.5x+ runs local clusters with token authentication, but ``ray start --head`` in token mode
creates no token, and Ray's default token file is ``~/.ray/auth_token``, shared by every cluster
of the user. So the head ``gazsi up`` starts gets a token of its own: 256 random bits in
``<data dir>/ray/auth_token`` (mode 0600, in a 0700 directory), handed to every ``ray`` and
``serve`` call through ``RAY_AUTH_TOKEN_PATH``. Nothing reads or writes the user's ``~/.ray``;
Ray's GCS, dashboard and job API refuse any local user or process that cannot read that file,
and every port binds to 127.0.0.1 only.

Every process of the head also carries ``GAZSI_RAY_CLUSTER=<temp dir>`` in its environment, so
``stop`` finds exactly this cluster's processes, including those Ray re-parents to init, and
never a neighbour's Ray (``ray stop`` would end every Ray on the machine).

>>> head = LocalRay.for_data_dir(Path("~/.local/share/gazsi").expanduser())   # doctest: +SKIP
>>> head.env()["RAY_AUTH_TOKEN_PATH"]                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MARKER_ENV", "LocalRay", "ray_temp_dir", "stop_local_ray", "tail_lines"]

MARKER_ENV = "GAZSI_RAY_CLUSTER"


def ray_temp_dir(data_dir: Path) -> str:
    """The Ray temp dir of the head `up` starts: short (Ray's socket paths must stay < 108 bytes)
    and unique per data directory, so `down` can find exactly the processes it started."""
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    return f"/tmp/gazsi-ray-{digest}"


@dataclass(frozen=True)
class LocalRay:
    """Where one local head keeps its token and temp dir; derived from the data directory."""

    data_dir: Path
    temp_dir: str

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> LocalRay:
        return cls(Path(data_dir).resolve(), ray_temp_dir(data_dir))

    @property
    def token_path(self) -> Path:
        return self.data_dir / "ray" / "auth_token"

    def ensure_token(self) -> Path:
        """Create the cluster's token once (0600); later `up`s reuse it."""
        path = self.token_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # the format `ray get-auth-token --generate` writes
        path.chmod(0o600)
        return path

    def env(self) -> dict[str, str]:
        """Environment for every `ray`/`serve` call and every process of this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                MARKER_ENV: self.temp_dir}

    def client_env(self) -> dict[str, str]:
        """The env a client of this head needs, or {} when `up` never made a token here."""
        return self.env() if self.token_path.exists() else {}

    def processes(self) -> list[Any]:
        """This head's live processes (psutil objects): found by the marker in their
        environment or the temp dir on their command line, plus their children."""
        import psutil

        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if any(self.temp_dir in part for part in proc.info["cmdline"] or ()) or self._marked(proc):
                    found[proc.pid] = proc
        for proc in list(found.values()):
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in proc.children(recursive=True)})
        found.pop(os.getpid(), None)  # the `gazsi` process itself carries the marker while it runs Ray
        return list(found.values())

    def _marked(self, proc: Any) -> bool:
        import psutil

        try:
            return bool(proc.environ().get(MARKER_ENV) == self.temp_dir)
        except (psutil.Error, OSError):
            return False

    def alive(self) -> bool:
        """Whether the head's GCS server still runs (the process a cluster cannot live without)."""
        return any("gcs_server" in name for name in _names(self.processes()))

    def stop(self, timeout_s: float = 15.0) -> int:
        """Terminate this head's processes, kill what outlives `timeout_s`; returns how many."""
        return _terminate(self.processes(), timeout_s)


def stop_local_ray(temp_dir: str, timeout_s: float = 15.0) -> int:
    """Stop the Ray processes started with ``--temp-dir=temp_dir`` (and their children)."""
    return LocalRay(Path("/"), temp_dir).stop(timeout_s)


def _names(procs: list[Any]) -> Iterator[str]:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            yield proc.name() + " " + " ".join(proc.cmdline()[:2])


def _terminate(procs: list[Any], timeout_s: float) -> int:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def tail_lines(text: str, max_lines: int = 12, max_chars: int = 2000) -> str:
    """The last complete lines of a subprocess's output, never cut mid-line (a line longer than
    `max_chars` alone is the one exception, cut at its start)."""
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    kept: list[str] = []
    size = 0
    for line in reversed(lines[-max_lines:]):
        if kept and size + len(line) + 1 > max_chars:
            break
        kept.append(line if len(line) <= max_chars else "…" + line[-max_chars:])
        size += len(line) + 1
    return "\n".join(reversed(kept))
