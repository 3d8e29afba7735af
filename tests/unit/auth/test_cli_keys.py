"""``gazsi keys`` end to end against the embedded store (SQLite in a temp data dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gazsi_cli.main import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def run(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> str:
    assert main(["keys", "--data-dir", str(data_dir), *args]) == 0
    return capsys.readouterr().out


def test_keys_lifecycle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    created = json.loads(run(capsys, tmp_path, "--json", "create", "--name", "svc", "--rpm", "60",
                             "--scopes", "all-MiniLM-L6-v2", "--expires-days", "30"))
    key = created["key"]
    assert key.startswith("gz_live_") and created["rpm"] == 60 and "key_hash" not in created
    listing = run(capsys, tmp_path, "list")
    assert created["prefix"] in listing and key not in listing  # the full key is shown only at creation
    shown = json.loads(run(capsys, tmp_path, "--json", "show", created["prefix"]))
    assert shown["id"] == created["id"] and "key" not in shown
    rotated = json.loads(run(capsys, tmp_path, "--json", "rotate", created["id"]))
    assert rotated["key"] != key and rotated["scopes"] == ["all-MiniLM-L6-v2"]
    old = json.loads(run(capsys, tmp_path, "--json", "show", created["id"]))
    assert old["revoked_at"] is not None
    revoked = json.loads(run(capsys, tmp_path, "--json", "revoke", rotated["prefix"]))
    assert revoked["revoked_at"] is not None
    assert json.loads(run(capsys, tmp_path, "--json", "usage")) == []
    text = run(capsys, tmp_path, "create", "--name", "human", "--admin")
    assert "shown only this once" in text and "admin" in text


def test_unknown_key_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["keys", "--data-dir", str(tmp_path), "show", "gz_live_nothere"]) == 2
    assert "no key" in capsys.readouterr().err
