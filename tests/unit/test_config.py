from __future__ import annotations

import pytest

from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_match_gazsi() -> None:
    s = load_settings()
    assert s.batcher.max_batch_size == 8
    assert s.batcher.queue_capacity == 128
    assert s.engine.backend == "auto"


def test_file_then_env_then_overrides(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "gazsi.yaml"
    cfg.write_text("batcher:\n  max_batch_size: 16\n  max_wait_us: 10\nedge:\n  port: 9000\n")
    assert load_settings(cfg).batcher.max_batch_size == 16
    monkeypatch.setenv("GAZSI_BATCHER__MAX_BATCH_SIZE", "24")
    s = load_settings(cfg)
    assert s.batcher.max_batch_size == 24  # env beats the file
    assert s.batcher.max_wait_us == 10  # the file's other values survive
    assert s.edge.port == 9000
    assert load_settings(cfg, batcher={"max_batch_size": 4}).batcher.max_batch_size == 4


def test_config_env_var_names_the_file(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"limits": {"max_inputs_per_request": 7}}')
    monkeypatch.setenv("GAZSI_CONFIG", str(cfg))
    assert load_settings().limits.max_inputs_per_request == 7


@pytest.mark.parametrize(
    "overrides",
    [
        {"batcher": {"max_batch_size": 0}},
        {"batcher": {"max_batch_size": 1024}, "engine": {"max_batch_size": 512}},
        {"engine": {"backend": "quantum"}},
        {"unknown_section": {}},
        {"batcher": {"no_such_knob": 1}},
        {"control_plane": {"suspect_after_missed": 5, "dead_after_missed": 2}},
        {"batcher": {"max_batch_tokens": 16}},
    ],
)
def test_invalid_settings_raise_config_error(overrides) -> None:
    with pytest.raises(ConfigError):
        load_settings(**overrides)


@pytest.mark.parametrize("content", ["batcher: [1, 2", "- just\n- a list\n"])
def test_bad_files_raise_config_error(tmp_path, content) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError):
        load_settings(cfg)


def test_missing_file_is_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")
