"""Three network namespaces and a real NAT between them: the cluster, a router that masquerades, an edge behind it.

Run by test_tunnel_nat.py inside ``unshare -rn`` with the nft command in GAZSI_NFT_ARGV/GAZSI_NFT_ENV (JSON).

    cluster (this namespace)          router (unshare -n)                    edge (unshare -n)
    gz-cr 10.77.1.1/24  ─── veth ───  gz-rc 10.77.1.2/24 | gz-re 192.168.77.1/24  ─── veth ───  gz-er 192.168.77.2/24
    control plane + gateway           masquerade out of gz-rc; new inbound     default via 192.168.77.1
    (no route to 192.168.77.0/24)     connections on gz-rc dropped (conntrack)  edge listens on 0.0.0.0

The edge (the real CLI, ONNX CPU engine) joins the control plane at https://10.77.1.1 with the join token and
dials the gateway's tunnel listener through the NAT; the gateway serves embeddings relayed through that tunnel.
Prints ``RESULT:{json}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.tunnel import serve_edge_in_namespace, tunnel_cluster

CLUSTER, ROUTER_OUT, ROUTER_IN, EDGE = "10.77.1.1", "10.77.1.2", "192.168.77.1", "192.168.77.2"
NFT = json.loads(os.environ["GAZSI_NFT_ARGV"])
NFT_ENV = dict(os.environ, **json.loads(os.environ.get("GAZSI_NFT_ENV", "{}")))


def sh(*cmd: str, ns: int | None = None, env: dict[str, str] | None = None) -> str:
    argv = [*(["nsenter", f"--net=/proc/{ns}/ns/net"] if ns else []), *cmd]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={proc.returncode} {proc.stderr.strip()}")
    return proc.stdout


def holder() -> subprocess.Popen[bytes]:
    # A process whose network namespace is the new one; veth ends are moved into it by pid.
    proc = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    time.sleep(0.3)
    return proc


def make_topology(router: int, edge: int) -> None:
    sh("ip", "link", "add", "gz-cr", "type", "veth", "peer", "name", "gz-rc")
    sh("ip", "link", "add", "gz-re", "type", "veth", "peer", "name", "gz-er")
    sh("ip", "link", "set", "gz-rc", "netns", str(router))
    sh("ip", "link", "set", "gz-re", "netns", str(router))
    sh("ip", "link", "set", "gz-er", "netns", str(edge))
    sh("ip", "addr", "add", f"{CLUSTER}/24", "dev", "gz-cr")
    sh("ip", "link", "set", "gz-cr", "up")
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{ROUTER_OUT}/24", "dev", "gz-rc"],
                ["ip", "addr", "add", f"{ROUTER_IN}/24", "dev", "gz-re"], ["ip", "link", "set", "gz-rc", "up"],
                ["ip", "link", "set", "gz-re", "up"], ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
        sh(*cmd, ns=router)
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{EDGE}/24", "dev", "gz-er"],
                ["ip", "link", "set", "gz-er", "up"], ["ip", "route", "add", "default", "via", ROUTER_IN]):
        sh(*cmd, ns=edge)
    # A home router: rewrite what leaves on the outside to the router's address, and let in from outside only
    # replies to connections made from inside (conntrack), never a new connection.
    rules = """
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "gz-rc" masquerade; }
}
table ip filter {
  chain forward { type filter hook forward priority 0; policy accept;
    iifname "gz-rc" ct state established,related accept; iifname "gz-rc" counter drop; }
}
"""
    _nft_file(router, rules)


def _nft_file(router: int, rules: str) -> None:
    path = Path(tempfile.mkstemp(suffix=".nft")[1])
    try:
        path.write_text(rules)
        sh(*NFT, "-f", str(path), ns=router, env=NFT_ENV)
    finally:
        path.unlink()


def connects(host: str, port: int, timeout: float = 2) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def seen_source(edge: int) -> str:
    """The address the cluster side sees when the edge connects to it: the router's, if it masquerades."""
    with socket.create_server((CLUSTER, 0)) as server:
        port = server.getsockname()[1]
        client = subprocess.Popen(["nsenter", f"--net=/proc/{edge}/ns/net", sys.executable, "-c",
                                   f"import socket; socket.create_connection(('{CLUSTER}', {port}), 5).close()"])
        server.settimeout(10)
        conn, peer = server.accept()
        conn.close()
        client.wait(10)
        return str(peer[0])


def direct_probes(router: int, edge_ns: int, port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The edge listens on 0.0.0.0 in its namespace, and from there it answers (so the port is live) ...
    out["edge_self_check"] = sh(sys.executable, "-c", f"import socket; socket.create_connection(('{EDGE}', "
                                f"{port}), 5); print('connected')", ns=edge_ns).strip()
    # ... but the cluster side has no route to its private address ...
    out["cluster_route"] = subprocess.run(["ip", "route", "get", EDGE], capture_output=True, text=True,
                                          timeout=10).stderr.strip()
    out["direct_no_route"] = connects(EDGE, port)
    # ... and even with one through the router, the NAT lets no new connection in.
    sh("ip", "route", "add", "192.168.77.0/24", "via", ROUTER_OUT)
    try:
        out["direct_via_router"] = connects(EDGE, port, 3)
    finally:
        sh("ip", "route", "del", "192.168.77.0/24", "via", ROUTER_OUT)
    out["nat_dropped"] = "counter packets 0 " not in sh(*NFT, "list", "table", "ip", "filter", ns=router, env=NFT_ENV)
    return out


async def scenario(tmp: Path, router: int, edge_ns: int, result: dict[str, Any]) -> None:
    result["source_seen_by_cluster"] = await asyncio.to_thread(seen_source, edge_ns)
    async with tunnel_cluster(tmp, host=CLUSTER) as cluster:
        await serve_edge_in_namespace(
            cluster, tmp, edge_ns, result, host="0.0.0.0", advertise=EDGE,
            what="the edge behind the NAT routable through its tunnel", inputs=["behind a NAT", "via the tunnel"],
            probes=lambda port: direct_probes(router, edge_ns, port))


def main() -> None:
    result: dict[str, Any] = {}
    router, edge = holder(), holder()
    try:
        make_topology(router.pid, edge.pid)
        result["topology"] = True
        asyncio.run(scenario(Path(tempfile.mkdtemp(prefix="gazsi-nat-")), router.pid, edge.pid, result))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        router.kill()
        edge.kill()
        print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
