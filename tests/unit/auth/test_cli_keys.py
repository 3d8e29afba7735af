"""``gazsi keys`` end to end against the embedded store (SQLite in a temp data dir)."""

from __future__ import annotations

import json
import time
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
    # Rotation keeps the key (id, settings, so usage and limit windows) and replaces the secret.
    assert rotated["key"] != key and rotated["scopes"] == ["all-MiniLM-L6-v2"]
    assert rotated["id"] == created["id"] and rotated["prefix"] != created["prefix"]
    assert rotated["expires_at"] == created["expires_at"] and rotated["revoked_at"] is None
    revoked = json.loads(run(capsys, tmp_path, "--json", "revoke", rotated["prefix"]))
    assert revoked["revoked_at"] is not None
    assert json.loads(run(capsys, tmp_path, "--json", "usage")) == []
    text = run(capsys, tmp_path, "create", "--name", "human", "--admin")
    assert "shown only this once" in text and "admin" in text


def test_unknown_key_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["keys", "--data-dir", str(tmp_path), "show", "gz_live_nothere"]) == 2
    assert "no key" in capsys.readouterr().err


def test_create_with_expiry_models_and_budgets_then_update(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = time.time()
    created = json.loads(run(capsys, tmp_path, "--json", "create", "--name", "svc", "--expires-in", "30d",
                             "--models", "m1", "m2", "--daily-quota", "5000", "--monthly-quota", "90000"))
    assert 30 * 86_400 - 5 <= created["expires_at"] - before <= 30 * 86_400 + 5
    assert created["scopes"] == ["m1", "m2"]
    assert (created["daily_quota"], created["monthly_quota"]) == (5000, 90000)
    updated = json.loads(run(capsys, tmp_path, "--json", "update", created["prefix"], "--rpm", "10",
                             "--daily-quota", "0", "--expires-in", "12h", "--models", "m3"))
    assert updated["id"] == created["id"] and updated["rpm"] == 10 and updated["daily_quota"] is None
    assert updated["monthly_quota"] == 90000 and updated["scopes"] == ["m3"]
    assert 12 * 3600 - 5 <= updated["expires_at"] - time.time() <= 12 * 3600 + 5
    never = json.loads(run(capsys, tmp_path, "--json", "update", created["id"], "--expires-in", "never"))
    assert never["expires_at"] is None


def test_bad_duration_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["keys", "--data-dir", str(tmp_path), "create", "--name", "x", "--expires-in", "soon"]) == 2
    assert "not a duration" in capsys.readouterr().err


def test_revoke_says_when_running_processes_refuse_the_key(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GAZSI_AUTH__REDIS_URL", raising=False)
    prefix = json.loads(run(capsys, tmp_path, "--json", "create", "--name", "x"))["prefix"]
    out = run(capsys, tmp_path, "revoke", prefix)
    # No Redis: the text must not let `[revoked]` be read as "refused everywhere now".
    assert "[revoked]" in out and "next key-store poll (every 0.25s" in out
    monkeypatch.setenv("GAZSI_AUTH__KEY_EVENTS_POLL_S", "0")
    prefix = json.loads(run(capsys, tmp_path, "--json", "create", "--name", "y"))["prefix"]
    assert "for up to 30s (auth.cache_ttl_s)" in run(capsys, tmp_path, "revoke", prefix)
