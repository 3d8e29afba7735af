"""`gazsi up`'s pieces that need no Ray: the local head's token, error tails, the printed examples."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from gazsi_cli import up
from gazsi_cli.local_ray import LocalRay, tail_lines
from gazsi_cluster.config import load_settings

pytestmark = pytest.mark.unit


def test_the_heads_token_is_private_reused_and_never_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    head = LocalRay.for_data_dir(tmp_path / "data")
    path = head.ensure_token()
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 bits, hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert head.ensure_token().read_text() == token  # a second `up` keeps the cluster's token
    assert head.env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path),
                          "GAZSI_RAY_CLUSTER": head.temp_dir}
    assert not (tmp_path / "home").exists()  # nothing under ~/.ray
    assert LocalRay.for_data_dir(tmp_path / "other").client_env() == {}


def test_failed_commands_show_whole_last_lines() -> None:
    stderr = "\n".join(f"line {i} " + "x" * 50 for i in range(100)) + "\nray.exceptions.AuthenticationError: no token\n"
    tail = tail_lines(stderr, max_lines=5, max_chars=400)
    lines = tail.splitlines()
    assert lines[-1] == "ray.exceptions.AuthenticationError: no token"
    assert all(ln.startswith("line ") for ln in lines[:-1])  # never cut mid-word
    assert len(tail) <= 400
    assert tail_lines("") == ""


def test_a_head_that_is_not_running_has_no_processes(tmp_path: Path) -> None:
    head = LocalRay.for_data_dir(tmp_path)
    assert head.processes() == [] and not head.alive() and head.stop() == 0


def _welcome(tmp_path: Path, capsys: pytest.CaptureFixture[str], admin_key: str | None) -> str:
    settings = load_settings(data_dir=str(tmp_path), gateway={"port": 8080})
    up._print_welcome(settings, "http://127.0.0.1:8000", admin_key)
    return capsys.readouterr().out


@pytest.mark.parametrize("first_run", [True, False])
def test_printed_examples_expand_the_key_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              first_run: bool) -> None:
    out = _welcome(tmp_path, capsys, "gz_test_abc" if first_run else None)
    curl = next(ln for ln in out.splitlines() if "curl -s" in ln and "/v1/embeddings" in ln)
    # bash expands $GAZSI_API_KEY inside the printed header (the old example single-quoted it).
    echoed = subprocess.run(["bash", "-c", "set -- " + curl.strip().rstrip("\\") + "; echo \"$5\""],
                            capture_output=True, text=True, env={"GAZSI_API_KEY": "gz_test_abc", "PATH": "/usr/bin:/bin"})
    assert echoed.stdout.strip() == "Authorization: Bearer gz_test_abc"
    assert 'api_key=os.environ["GAZSI_API_KEY"]' in out
    assert ("export GAZSI_API_KEY=gz_test_abc" in out) is first_run
    assert "stop it with: " in out and "down" in out


def test_one_line_per_edge_says_its_data_plane_and_why() -> None:
    nodes = [
        {"node_id": "edge-b", "url": "http://127.0.0.1:9001", "state": "suspect", "dataplane": "asgi",
         "dataplane_reason": "requested asgi"},
        {"node_id": "edge-a", "url": "http://127.0.0.1:9000", "state": "healthy", "dataplane": "fast",
         "dataplane_reason": "auto: fast front, because no CUDA GPU — 6 HTTP workers"},
        {"node_id": "edge-c", "url": "http://127.0.0.1:9002", "state": "healthy", "dataplane": "fast"},  # older edge
    ]
    assert up._dataplane_lines(nodes) == [
        "edge edge-a at http://127.0.0.1:9000: data plane fast (auto: fast front, because no CUDA GPU — 6 HTTP workers)",
        "edge edge-b at http://127.0.0.1:9001: data plane asgi (requested asgi) [suspect]",
        "edge edge-c at http://127.0.0.1:9002: data plane fast",
    ]
    assert up._dataplane_lines([], "timed out") == ["the edges' data planes could not be read: timed out"]
    assert up._dataplane_lines([]) == ["the edges' data planes could not be read: the control plane lists no edges"]


def _answers(monkeypatch: pytest.MonkeyPatch, result: subprocess.CompletedProcess[str] | Exception) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(up, "_run", fake_run)
    return calls


def test_the_data_planes_come_from_the_control_plane_and_a_failure_is_only_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gazsi_cluster.errors import ServiceUnavailable

    listing = '{"data": [{"node_id": "e1", "url": "http://127.0.0.1:1", "dataplane": "fast"}]}'
    calls = _answers(monkeypatch, subprocess.CompletedProcess([], 0, "some library said hi\n" + listing, ""))
    assert up._edge_dataplanes({}, "cfg.yaml", None) == ([{"node_id": "e1", "url": "http://127.0.0.1:1",
                                                           "dataplane": "fast"}], "")
    assert calls[0][-6:] == ["--config", "cfg.yaml", "nodes", "--ray", "--json", "list"]
    _answers(monkeypatch, subprocess.CompletedProcess([], 2, "", "gazsi: error: no control plane actor\n"))
    assert up._edge_dataplanes({}, None, None) == ([], "gazsi: error: no control plane actor")
    _answers(monkeypatch, subprocess.CompletedProcess([], 0, "not json", ""))
    assert up._edge_dataplanes({}, None, None)[1] == "unreadable `gazsi nodes --ray --json list` output"
    _answers(monkeypatch, ServiceUnavailable("`python -m gazsi_cli.main …` did not finish in 30s.\nmore"))
    assert up._edge_dataplanes({}, None, None) == ([], "`python -m gazsi_cli.main …` did not finish in 30s.")
    _answers(monkeypatch, FileNotFoundError("no python"))
    assert up._edge_dataplanes({}, None, None) == ([], "no python")
