"""`gazsi up` / `status` / `down` on embedded defaults (SQLite keys, in-process caches, CPU engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._netns import run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(700)]


def test_gazsi_up_status_down() -> None:
    r = run_scenario(Path(__file__).with_name("_up_scenario.py"), timeout_s=680)
    assert r["up_rc"] == 0, r["up_out"] + r["up_err"]
    assert r["admin_key_shown"], r["up_out"]
    assert r["db_files"]  # the embedded SQLite store exists…
    assert r["plain_key_in_db"] is False  # …and holds only the key's hash
    assert r["direct_status"] == 200
    assert r["dims"] == 384
    assert r["proxy_status"] == 200
    assert r["keys_list_has_prefix"]
    assert r["status_rc"] == 0
    assert "RUNNING" in r["status_out"]
    assert r["down_rc"] == 0
    assert r["gateway_after_down"] == "gone"
