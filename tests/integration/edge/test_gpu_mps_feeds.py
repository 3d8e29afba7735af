"""``edge.gpu_mps: on`` with feed processes: the node starts its own MPS daemon before its CUDA context, every
feed process is that daemon's client (its pipe directory in their environment), and the daemon quits with
the node. The kernels are their CPU references and ``nvidia-cuda-mps-control`` a stand-in that records its
calls (no NVIDIA driver here); on the GPU machine ``benchmarks/h100_bench.py --gpu-variant mps:gpu_mps=on``
runs the real one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.edge import EdgeProcess
from tests.unit.test_gpu_mps import _CONTROL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _cmdline(proc: psutil.Process) -> list[str]:
    """A child's command line; [] for one that ended since it was listed (the daemon's shell helpers)."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_feed_processes_are_clients_of_the_nodes_own_daemon(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-cuda-mps-control").write_text(_CONTROL)
    (bin_dir / "nvidia-cuda-mps-control").chmod(0o755)
    log = tmp_path / "calls.log"
    edge = EdgeProcess(tmp_path / "data", "--workers", "2", "--backend", "fake", "--no-auth",
                       command=[sys.executable, "-m", "tests.support.gpu_plane"],
                       env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "GAZSI_EDGE__GPU_MPS": "on",
                            "GAZSI_CACHE__ENABLED": "false"})
    try:
        started = log.read_text().split()
        assert started[0] == "start", started
        pipe = started[1]
        feeds = [p for p in psutil.Process(edge.proc.pid).children(recursive=True)
                 if "tests.support.gpu_worker" in " ".join(_cmdline(p))]
        assert len(feeds) == 2
        # (/proc shows a process's environment as it started: the node's own is set later, in its
        # constructor, and checked in tests/unit/test_gpu_mps.py.)
        for feed in feeds:
            assert _environ(feed.pid).get("CUDA_MPS_PIPE_DIRECTORY") == pipe, feed.pid
        r = httpx.get(f"{edge.url}/inference", params={"d": "served by a feed under MPS"}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        assert edge.stop() == 0, "".join(edge.lines)
    assert log.read_text().splitlines()[-2:] == [f"quit {pipe}", "exit"]
    assert not Path(pipe).exists()
