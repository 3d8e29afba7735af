"""The README's first command on a fresh machine: `gazsi up` / the printed example / `status` / `down`.

The scenario runs with HOME an empty directory (no `~/.ray`, no data directory), so no token or
file left by another test or by the user can make it pass; it is marked ``fresh_machine`` and
runs first in the suite (tests/conftest.py) so that order cannot hide a missing step either.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ._netns import run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fresh_machine, pytest.mark.timeout(900)]


def test_gazsi_up_from_an_empty_home_and_when_it_fails() -> None:
    r = run_scenario(Path(__file__).with_name("_up_scenario.py"), timeout_s=880)
    print({k: r.get(k) for k in ("up_s", "first_embedding_s", "down_s", "second_up_s", "dataplane_lines")})  # `pytest -s`
    assert r["up_rc"] == 0, r["up_out"] + r["up_err"]
    # One line for the one edge: its data plane and why (`auto` here: the fast front, sized to the replica).
    assert len(r["dataplane_lines"]) == 1, r["up_out"]
    assert re.fullmatch(r"gazsi: edge \S+ at http://127\.0\.0\.1:\d+: data plane (fast|gpu|gpunetio) "
                        r"\(auto: .+\)", r["dataplane_lines"][0]), r["dataplane_lines"]
    assert "data plane fast" not in r["dataplane_lines"][0] or re.search(r" — \d+ HTTP workers?\)$",
                                                                           r["dataplane_lines"][0])
    assert r["admin_key_shown"], r["up_out"]
    assert r["direct_url_printed"], r["up_out"]
    assert r["db_files"]  # the embedded SQLite store exists…
    assert r["plain_key_in_db"] is False  # …and holds only the key's hash
    assert r["export_line_has_key"], r["up_out"]
    # The curl example, pasted as printed, works.
    assert r["printed_curl"]["status"] == "200" and r["printed_curl"]["dims"] == 384, r["printed_curl"]
    assert r["proxy_status"] == 200
    assert r["keys_list_has_prefix"]
    # With the embedded Redis of `gazsi up`, revocation is published: the CLI says when it applies.
    assert "Published to the cluster's Redis" in r["revoke_out"], r["revoke_out"]
    assert r["status_rc"] == 0 and "RUNNING" in r["status_out"]
    assert r["down_rc"] == 0, r["down_out"]
    assert "local Ray head stopped" in r["down_out"]
    assert r["leftovers_after_down"] == [], r["leftovers_after_down"]  # no Ray client server, no Redis
    assert r["gateway_after_down"] == "gone"
    # Second `up` on the same data directory: the key exists and the examples use $GAZSI_API_KEY.
    assert r["second_up_rc"] == 0, r["second_up_out"]
    assert "admin key (shown once" not in r["second_up_out"]
    assert r["second_printed_curl"]["status"] == "200", r["second_printed_curl"]
    assert r["second_down_rc"] == 0 and r["leftovers_after_second_down"] == []
    # Nothing was written to ~/.ray: the cluster's token lives in the data directory.
    assert r["home_ray_dir"] == [], r["home_ray_dir"]

    # An `up` whose Ray head dies mid-deploy fails fast with the reason and stops what it started;
    # `down` afterwards does not claim to have shut anything down.
    dies = r["dies"]
    assert dies["killed_gcs"] >= 1, dies
    assert dies["rc"] == 2 and "the local Ray head exited" in dies["out"], dies
    assert dies["exit_after_kill_s"] < 60, dies
    assert dies["leftovers"] == [], dies
    assert "nothing to stop" in dies["down_out"] and "shut down" not in dies["down_out"], dies


def test_gazsi_up_two_edges_limits_revocation_and_usage_hold_cluster_wide() -> None:
    r = run_scenario(Path(__file__).with_name("_up_two_edges_scenario.py"), timeout_s=880)
    print({k: r.get(k) for k in ("limit", "revocation", "crash")})  # `pytest -s`; docs/reliability.md
    assert r["up_rc"] == 0, r["up_out"]
    assert r["edges"] == 2, r
    limit = r["limit"]
    # 3x the key's requests/min sent to both edges at once: exactly the limit is answered.
    assert limit["ok"] == 24 and limit["limited"] == 48 and limit["other"] == [], limit
    assert limit["retry_after_on_429"], limit
    # Each edge took 36 of them: with per-edge limits 48 would have been answered, not 24.
    assert sorted(sum(c.values()) for c in limit["per_edge"].values()) == [36, 36], limit
    rev = r["revocation"]
    assert rev["before"] == [200, 200], rev
    assert all(t is not None and t <= 1.0 for t in rev["refused_after_s"]), rev  # ≤ 1 s on every edge
    crash = r["crash"]
    assert crash["killed"] == 1 and crash["answered"] == 30, crash
    assert crash["usage_requests"] == crash["answered"], crash  # nothing answered is missing
    assert r["down_rc"] == 0
