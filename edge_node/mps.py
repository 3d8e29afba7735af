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

How much of the GPU each client may hold at once is MPS's active thread percentage, read by a client when
it makes its context: the node process (the engine) sets ``edge.gpu_mps_engine_sm_pct`` here, a feed
process sets ``edge.gpu_mps_feed_sm_pct`` at its start (:func:`join_share`). An engine held below 100 %
leaves SMs free at all times, so a feed's small parse kernels need not wait for the model's blocks: beside a
load filling every SM that took a probe kernel's round trip from 54 to 13 us (H100), though the plane itself
gained nothing at 85 % and lost 14 % at 50 (docs/gpunetio.md): 100 stays the default.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gazsi_cluster.errors import ConfigError

__all__ = ["MpsDaemon", "join_share", "start_mps"]

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
SHARE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", SHARE)
_PR_SET_PDEATHSIG = 1


class MpsDaemon:
    """``nvidia-cuda-mps-control -f`` as this process's child; its clients are this process and its children.

    In the foreground and with ``PR_SET_PDEATHSIG``, so a node that is killed (even ``kill -9``) takes its
    daemon along: on the H100 (2026-12-06) a ``-d`` daemon outlived a node that never became ready.
    """

    def __init__(self, control: str, root: Path, sm_pct: int = 100) -> None:
        self.control, self.root, self.sm_pct = control, root, sm_pct
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
        self._saved = {k: os.environ.get(k) for k in _ENV}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_s: float = 10.0) -> None:
        pipe, logs = (Path(p) for p in self.env.values())
        pipe.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "control.out").open("wb") as out:
            # A session of its own: a signal to the node's process group (Ctrl-C in a terminal, `kill -TERM -PGID`)
            # must not end the daemon while the node drains, or every feed process's CUDA calls fail with
            # cudaErrorMpsRpcFailure (the H100, 2026-12-07). The node quits it last (stop); PDEATHSIG if it dies.
            self.proc = subprocess.Popen([self.control, "-f"], env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                         start_new_session=True)
        # Clients that start before the control socket exists would run without MPS, silently: wait for it.
        deadline = time.monotonic() + ready_s
        while not any(pipe.iterdir()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = (logs / "control.out").read_text(errors="replace").strip()[-500:]
                self._reap()
                raise OSError(f"exited with {self.proc.returncode}: {said}" if self.proc.returncode is not None
                              else f"no control socket in {pipe} after {ready_s:.0f} s")
            time.sleep(0.02)
        os.environ.update(self.env)
        join_share(self.sm_pct)  # this process's (the engine's) share; a feed process sets its own

    def stop(self) -> None:
        """Quit the daemon (and its server, once the clients are gone), restore the environment."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run([self.control], input=b"quit\n", env={**os.environ, **self.env}, timeout=30,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        self._reap()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(self.root, ignore_errors=True)

    def _reap(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _has_context() -> bool:
    """Whether this process already made its CUDA context (then it cannot become an MPS client)."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


def join_share(sm_pct: int) -> None:
    """This process's share of the GPU's SMs (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) as an MPS client of the
    node's daemon, before it makes its CUDA context; nothing outside MPS. Always written, so a feed process
    does not keep the engine's share it inherited from the node."""
    if "CUDA_MPS_PIPE_DIRECTORY" in os.environ:
        os.environ[SHARE] = str(sm_pct)


def start_mps(mode: str, engine_sm_pct: int = 100) -> MpsDaemon | None:
    """Start the node's MPS daemon as ``edge.gpu_mps`` says; None when off or (``auto``) not available.
    This process joins it with ``engine_sm_pct`` of the SMs (``edge.gpu_mps_engine_sm_pct``).

    ``on`` makes a missing or failing ``nvidia-cuda-mps-control`` a :class:`ConfigError`; ``auto`` logs why
    and goes on without MPS (each process its own context, as before).
    """
    if mode == "off":
        return None
    control = shutil.which(CONTROL)
    if control is None:
        why = f"{CONTROL} is not on PATH (it ships with the NVIDIA driver's utilities)"
    else:
        daemon = MpsDaemon(control, Path(tempfile.mkdtemp(prefix="gazsi-mps-")), engine_sm_pct)
        try:
            daemon.start()
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"{CONTROL} -f failed: {exc}"
            shutil.rmtree(daemon.root, ignore_errors=True)
        else:
            note = " (this process already has a CUDA context: only the feed processes are its clients)" \
                if _has_context() else ""
            log.info("gpu data plane: CUDA MPS daemon at %s%s, the engine's share of the SMs %d %%", daemon.root,
                     note, engine_sm_pct)
            return daemon
    if mode == "on":
        raise ConfigError(f"edge.gpu_mps is on but {why}")
    log.info("gpu data plane without MPS (edge.gpu_mps auto): %s", why)
    return None
