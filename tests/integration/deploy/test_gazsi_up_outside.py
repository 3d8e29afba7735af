"""`gazsi up` serves the control plane's HTTPS join API and a tunnel listener; the join command it prints,
run as printed, brings in an edge that serves through its reverse tunnel (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._netns import run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_printed_join_command_brings_in_an_edge_served_through_its_tunnel() -> None:
    r = run_scenario(Path(__file__).with_name("_up_outside_edge_scenario.py"), timeout_s=880)
    print({k: r.get(k) for k in ("join_command", "codes", "outside_answered", "after_stop_codes")})
    assert r["up_rc"] == 0, r["up_out"]
    assert r["join_command"].startswith("gazsi edge serve ") and "--join-token \"$(cat " in r["join_command"]
    assert r["join_json"]["control_plane_url"].startswith("https://127.0.0.1:"), r["join_json"]
    assert r["token_mode"] == "0o600"
    assert r["tunnel_connected"] and r["control_plane_state"] == "joined", r["edge_lines"]
    assert r["codes"] == [200], r
    assert r["outside_answered"] > 0, r  # the gateway routed some of the 60 through the tunnel
    assert r["after_stop_codes"] == [200], r  # the Serve edge takes over when it leaves
    assert r["down_rc"] == 0
