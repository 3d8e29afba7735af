"""A private CUDA MPS daemon for the gpu data plane's processes (``edge.gpu_mps``).

The gpu plane runs its HTTP kernels in ``edge.workers`` feed processes beside the node process's
engine. Without MPS each process has a CUDA context of its own and the GPU time-slices them: on the
H100 (2026-12-06) ten feeds spent 8.5-10.2 ms per burst waiting for their turn to build, and every
synchronise spun meanwhile (1.16 ms of CPU per request, docs/benchmarks.md). Under MPS the processes
are clients of one server context, so their kernels share the GPU at once instead of in turns.

The daemon is the node's own: its pipe and log directories are a fresh temporary folder, named to the
node's processes through ``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY`` (set in this process
before its CUDA context exists, and inherited by the feed processes it starts), so it never meets an
MPS daemon the machine may already run, and it is told to quit when the node stops. A process that
already holds a CUDA context when the daemon starts stays outside it (said in the log).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gazsi_cluster.errors import ConfigError

__all__ = ["MpsDaemon", "start_mps"]

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


class MpsDaemon:
    """A running ``nvidia-cuda-mps-control -d`` whose clients are this process and its children."""

    def __init__(self, control: str, root: Path) -> None:
        self.control, self.root = control, root
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
        self._saved = {k: os.environ.get(k) for k in _ENV}

    def start(self) -> None:
        for path in self.env.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        # -d forks the control daemon and returns; the server itself starts with the first client.
        subprocess.run([self.control, "-d"], env={**os.environ, **self.env}, check=True, timeout=30,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.environ.update(self.env)

    def stop(self) -> None:
        """Quit the daemon (and its server, once the clients are gone), restore the environment."""
        with contextlib.suppress(Exception):
            subprocess.run([self.control], input=b"quit\n", env={**os.environ, **self.env}, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(self.root, ignore_errors=True)


def _has_context() -> bool:
    """Whether this process already made its CUDA context (then it cannot become an MPS client)."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


def start_mps(mode: str) -> MpsDaemon | None:
    """Start the node's MPS daemon as ``edge.gpu_mps`` says; None when off or (``auto``) not available.

    ``on`` makes a missing or failing ``nvidia-cuda-mps-control`` a :class:`ConfigError`; ``auto`` logs why
    and goes on without MPS (each process its own context, as before).
    """
    if mode == "off":
        return None
    control = shutil.which(CONTROL)
    if control is None:
        why = f"{CONTROL} is not on PATH (it ships with the NVIDIA driver's utilities)"
    else:
        daemon = MpsDaemon(control, Path(tempfile.mkdtemp(prefix="gazsi-mps-")))
        try:
            daemon.start()
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            why = f"{CONTROL} -d failed: {exc!r} {detail.decode(errors='replace').strip()}"
            shutil.rmtree(daemon.root, ignore_errors=True)
        else:
            note = " (this process already has a CUDA context: only the feed processes are its clients)" \
                if _has_context() else ""
            log.info("gpu data plane: CUDA MPS daemon at %s%s", daemon.root, note)
            return daemon
    if mode == "on":
        raise ConfigError(f"edge.gpu_mps is on but {why}")
    log.info("gpu data plane without MPS (edge.gpu_mps auto): %s", why)
    return None
