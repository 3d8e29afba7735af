"""Gateway cannot connect to the edge, requests still reach it through the tunnel (issue 17).

Two network namespaces and a veth pair (see _tunnel_netns_scenario.py): the edge's listener is on its
own namespace's loopback, so nothing on the cluster side can open a connection to it; the edge joins and
dials out. No NAT here: "outbound only" comes from where the edge listens, not from address translation;
test_tunnel_nat.py does the same behind a real nftables masquerade router.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.required import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[3]


def test_the_gateway_cannot_dial_the_edge_but_serves_it_through_the_tunnel() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None or shutil.which("nsenter") is None:
        unavailable("unshare/ip/nsenter are missing: the namespaces cannot be made")
    script = Path(__file__).with_name("_tunnel_netns_scenario.py")
    proc = subprocess.run(
        ["unshare", "-rn", "bash", "-c", f"ip link set lo up && exec '{sys.executable}' '{script}'"],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1",
                 PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))),
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr[:2000]:
        unavailable(f"unshare -rn / veth not permitted here: {proc.stderr[:500]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
    assert lines, f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    r = json.loads(lines[-1][len("RESULT:"):])
    print({k: v for k, v in r.items() if k != "edge_lines"})
    assert r.get("veth") and r.get("edge_port"), r
    assert r["reach"] == "tunnel" and r["facts_address"] == "10.77.0.2", r
    assert r["table_url"] == f"tunnel://{r['node_id']}" and r["tunnel_ids"] == [r["node_id"]], r
    # No direct path from the cluster side to the edge...
    assert r["direct_to_advertised"].startswith("ConnectionRefusedError"), r
    assert r["direct_to_loopback"].startswith("ConnectionRefusedError"), r
    # ...and yet the gateway's answers come from it, through the tunnel it opened.
    assert r["via_gateway"] == {"status": 200, "dims": [384, 384]}, r
    assert r["more_codes"] == [200], r
    assert r["left_table_ms"] < 1000, r
    assert r["after_kill"]["status"] == 503 and set(r["after_kill"]["body"]["error"]) == {
        "message", "type", "param", "code"}, r
    assert proc.returncode == 0, proc.stderr[-3000:]
