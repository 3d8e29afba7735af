"""``edge.gpu_mps``: the node's private CUDA MPS daemon, with a stand-in ``nvidia-cuda-mps-control`` on PATH.

No machine here has the NVIDIA driver's utilities; the stand-in records how it was called (the daemon's
``-d``, the ``quit`` on its stdin, the pipe directory each call was given), which is the whole contract
between the node and the real control program.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_node.mps import start_mps
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import ConfigError

pytestmark = pytest.mark.unit

_CONTROL = """#!/bin/sh
if [ "$1" = "-f" ]; then
  [ -n "$FAIL" ] && { echo "cannot reach the GPU"; exit 3; }
  echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY" >> "$LOG"
  : > "$CUDA_MPS_PIPE_DIRECTORY/control"
  while [ ! -e "$CUDA_MPS_PIPE_DIRECTORY/quit" ]; do sleep 0.02; done
  echo "exit" >> "$LOG"
  exit 0
fi
echo "$(cat) $CUDA_MPS_PIPE_DIRECTORY" >> "$LOG"
touch "$CUDA_MPS_PIPE_DIRECTORY/quit"
"""


def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(_CONTROL)
    control.chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("LOG", str(log))
    if fail:
        monkeypatch.setenv("FAIL", "1")
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        monkeypatch.delenv(key, raising=False)
    return log


def calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_the_daemon_is_the_nodes_own_and_quits_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       mode: str) -> None:
    log = stand_in(tmp_path, monkeypatch)
    daemon = start_mps(mode)
    assert daemon is not None
    pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
    # A fresh folder of its own (never the machine's default /tmp/nvidia-mps), set for this process and
    # so for every feed process it starts.
    assert pipe.startswith(str(daemon.root)) and Path(pipe).is_dir()
    assert os.environ["CUDA_MPS_LOG_DIRECTORY"].startswith(str(daemon.root))
    assert calls(log) == [["start", pipe, os.environ["CUDA_MPS_LOG_DIRECTORY"]]]
    assert daemon.proc is not None and daemon.proc.poll() is None  # in the foreground, our child
    # In a session of its own: a signal to the node's process group does not end it before the node quits it.
    assert os.getsid(daemon.proc.pid) == daemon.proc.pid != os.getsid(0)
    daemon.stop()
    assert calls(log)[1:] == [["quit", pipe], ["exit"]]  # told to quit through the same pipe directory
    assert daemon.proc.returncode == 0
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and "CUDA_MPS_LOG_DIRECTORY" not in os.environ
    assert not daemon.root.exists()


def test_off_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = stand_in(tmp_path, monkeypatch)
    assert start_mps("off") is None
    assert calls(log) == [] and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ


def test_without_the_control_program_auto_goes_on_and_on_refuses(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert start_mps("auto") is None
    with pytest.raises(ConfigError, match=r"edge\.gpu_mps is on but nvidia-cuda-mps-control is not on PATH"):
        start_mps("on")


def test_a_daemon_that_fails_to_start_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in(tmp_path, monkeypatch, fail=True)
    assert start_mps("auto") is None
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    with pytest.raises(ConfigError, match="cannot reach the GPU"):
        start_mps("on")


def _gpu_settings(tmp_path: Path, **edge: object):  # type: ignore[no-untyped-def]
    return load_settings(data_dir=str(tmp_path / "data"), engine={"backend": "fake"},
                         edge={"dataplane": "gpu", "gpu_mps": "on", "workers": 1, **edge})


def test_a_node_without_a_gpu_falls_back_to_fast_and_quits_its_daemon(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_node import node as node_module

    log = stand_in(tmp_path, monkeypatch)
    monkeypatch.setattr(node_module, "choose_dataplane", lambda requested: ("fast", "test: no CUDA GPU"))
    node = node_module.EdgeNode(_gpu_settings(tmp_path))
    assert node.dataplane == "fast"
    assert [c[0] for c in calls(log)] == ["start", "quit", "exit"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ


def test_a_node_that_cannot_be_built_leaves_no_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_node import node as node_module
    from gazsi_cluster.tls import create_deployment_certs

    log = stand_in(tmp_path, monkeypatch)
    monkeypatch.setattr(node_module, "choose_dataplane", lambda requested: ("gpu", "test: a GPU is present"))
    certs = create_deployment_certs(tmp_path / "tls")
    settings = _gpu_settings(tmp_path, tls={"certfile": str(certs.server_cert), "keyfile": str(certs.server_key)})
    with pytest.raises(ConfigError, match="cannot serve TLS"):
        node_module.EdgeNode(settings)
    assert [c[0] for c in calls(log)] == ["start", "quit", "exit"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ


def test_one_process_on_the_gpu_starts_no_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_node import node as node_module

    log = stand_in(tmp_path, monkeypatch)
    monkeypatch.setattr(node_module, "choose_dataplane", lambda requested: ("fast", "test"))
    node_module.EdgeNode(_gpu_settings(tmp_path, gpu_feed="node"))
    node_module.EdgeNode(load_settings(data_dir=str(tmp_path / "d2"), engine={"backend": "fake"},
                                       edge={"dataplane": "fast", "gpu_mps": "on"}))
    assert calls(log) == []


def test_the_daemon_dies_with_a_killed_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys
    import time

    import psutil

    log = stand_in(tmp_path, monkeypatch)
    node = subprocess.Popen([sys.executable, "-c", "import sys, time; from edge_node.mps import start_mps; "
                             "d = start_mps('on'); print(d.proc.pid, flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert node.stdout is not None
    daemon = psutil.Process(int(node.stdout.readline()))
    assert calls(log)[0][0] == "start"
    node.kill()  # no stop(), no quit: PR_SET_PDEATHSIG ends the daemon
    node.wait(10)
    deadline = time.monotonic() + 10
    while daemon.is_running() and daemon.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE


async def test_a_node_stopped_before_it_started_quits_its_daemon(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Serve calls the replica's __del__ (node.stop()) after a constructor that failed later on.
    from edge_node import node as node_module

    log = stand_in(tmp_path, monkeypatch)
    monkeypatch.setattr(node_module, "choose_dataplane", lambda requested: ("gpu", "test: a GPU is present"))
    node = node_module.EdgeNode(_gpu_settings(tmp_path))
    assert [c[0] for c in calls(log)] == ["start"]
    await node.stop()
    assert [c[0] for c in calls(log)] == ["start", "quit", "exit"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ


def test_yaml_on_and_off_mean_on_and_off(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads bare on/off as booleans; a config file saying `gpu_mps: on` means "on".
    cfg = tmp_path / "gazsi.yaml"
    cfg.write_text("edge:\n  gpu_mps: on\n")
    assert load_settings(cfg).edge.gpu_mps == "on"
    cfg.write_text("edge:\n  gpu_mps: off\n")
    assert load_settings(cfg).edge.gpu_mps == "off"


async def test_the_engine_and_each_feed_join_with_their_share_of_the_sms(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_node import node as node_module
    from edge_node.mps import SHARE
    from edge_node.transports.fast.worker import WorkerTransport
    from edge_node.transports.gpu.worker import GpuWorkerTransport

    stand_in(tmp_path, monkeypatch)
    monkeypatch.delenv(SHARE, raising=False)
    monkeypatch.setattr(node_module, "choose_dataplane", lambda requested: ("gpu", "test: a GPU is present"))
    settings = _gpu_settings(tmp_path, gpu_mps_engine_sm_pct=70, gpu_mps_feed_sm_pct=15)
    node = node_module.EdgeNode(settings)
    # The node process (the engine's context is made later, in it) joins with the engine's share, and its feed
    # processes inherit this environment...
    assert os.environ[SHARE] == "70"
    # ...so a feed process writes its own before it makes its context.
    seen: dict[str, str] = {}
    monkeypatch.setattr(WorkerTransport, "__init__", lambda self, node, handoff: seen.update(share=os.environ[SHARE]))
    GpuWorkerTransport(node, None)  # type: ignore[arg-type]
    assert seen == {"share": "15"}
    await node.stop()
    assert SHARE not in os.environ  # restored with the daemon's other variables


def test_outside_mps_no_share_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_node.mps import SHARE, join_share

    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv(SHARE, raising=False)
    join_share(40)
    assert SHARE not in os.environ
