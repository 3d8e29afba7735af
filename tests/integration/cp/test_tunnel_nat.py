"""An edge behind a real NAT joins with a token and serves through its tunnel (issue 17).

Three network namespaces (see _tunnel_nat_scenario.py): the cluster side, a router doing nftables masquerade
with conntrack (new inbound connections dropped), and the edge on a private subnet behind it. The cluster side
has no route to the edge's address and, given one, the NAT drops the connection; the edge still joins the
control plane over HTTPS, dials the gateway's tunnel listener out through the NAT, and the gateway's answers
come from it. nft is Debian's, unpacked by scripts/bootstrap (tests/support/nft.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.nft import nft_command
from tests.support.required import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[3]


def test_an_edge_behind_a_nat_serves_through_its_tunnel_and_cannot_be_dialled() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None or shutil.which("nsenter") is None:
        unavailable("unshare/ip/nsenter are missing: the namespaces cannot be made")
    nft = nft_command()
    if nft is None:
        unavailable("nft not found: run scripts/bootstrap (it unpacks Debian's nftables into .venv/nft) "
                    "or set GAZSI_NFT")
    argv, nft_env = nft
    script = Path(__file__).with_name("_tunnel_nat_scenario.py")
    proc = subprocess.run(
        ["unshare", "-rn", "bash", "-c", f"ip link set lo up && exec '{sys.executable}' '{script}'"],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", GAZSI_NFT_ARGV=json.dumps(argv), GAZSI_NFT_ENV=json.dumps(nft_env),
                 PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))),
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr[:2000]:
        unavailable(f"unshare -rn / veth / nft not permitted here: {proc.stderr[:500]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
    assert lines, f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    r = json.loads(lines[-1][len("RESULT:"):])
    print({k: v for k, v in r.items() if k != "edge_lines"})
    assert r.get("topology") and r.get("edge_port"), r
    # The router masquerades: the cluster sees the edge's connections come from the router's outside address.
    assert r["source_seen_by_cluster"] == "10.77.1.2", r
    assert r["reach"] == "tunnel" and r["facts_address"] == "192.168.77.2", r
    assert r["table_url"] == f"tunnel://{r['node_id']}" and r["tunnel_ids"] == [r["node_id"]], r
    # The edge's listener is up on its private address, yet the cluster side cannot reach it: no route ...
    assert r["edge_self_check"] == "connected", r
    assert "unreachable" in r["cluster_route"].lower(), r
    assert r["direct_no_route"].startswith("OSError: [Errno 101]"), r
    # ... and with a route through the router, the NAT drops the new connection (its counter moved).
    assert r["direct_via_router"].startswith(("TimeoutError", "OSError")), r
    assert r["nat_dropped"], r
    # Through the tunnel the edge opened, the gateway's answers come from it (real ONNX CPU engine).
    assert r["via_gateway"] == {"status": 200, "dims": [384, 384]}, r
    assert r["more_codes"] == [200], r
    # Killed, it leaves routing; then the gateway answers 503 with the one error body.
    assert r["left_table_ms"] < 1000, r
    assert r["after_kill"]["status"] == 503 and set(r["after_kill"]["body"]["error"]) == {
        "message", "type", "param", "code"}, r
    assert proc.returncode == 0, proc.stderr[-3000:]
