"""Two network namespaces joined by a veth pair: the cluster in one, an edge nobody can dial in the other.

Run by test_tunnel_netns.py inside ``unshare -rn`` (namespace A, the "cluster side", 10.77.0.1). The
edge runs in a namespace B made here (``unshare -n``), reached over a veth pair as 10.77.0.2, and its
listener binds B's own loopback: A can open no connection to it, while B can open connections to A.
That is the property a NAT gives an edge (outbound only), without one; _tunnel_nat_scenario.py has a real
NAT (nftables masquerade and conntrack in a router namespace).

The edge (the real CLI, ONNX CPU engine) joins the control plane at https://10.77.0.1 with the join
token, dials the gateway's tunnel listener on 10.77.0.1, and serves embeddings the gateway relays through
the tunnel. Prints ``RESULT:{json}``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.tunnel import serve_edge_in_namespace, tunnel_cluster

A, B = "10.77.0.1", "10.77.0.2"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10)


def make_namespace_b() -> subprocess.Popen[bytes]:
    holder = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    time.sleep(0.3)
    ns = f"--net=/proc/{holder.pid}/ns/net"
    sh("ip", "link", "add", "name", "gz-a", "type", "veth", "peer", "name", "gz-b")
    sh("ip", "link", "set", "gz-b", "netns", str(holder.pid))
    sh("ip", "addr", "add", f"{A}/24", "dev", "gz-a")
    sh("ip", "link", "set", "gz-a", "up")
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{B}/24", "dev", "gz-b"],
                ["ip", "link", "set", "gz-b", "up"]):
        sh("nsenter", ns, *cmd)
    return holder


def connects(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=2):
            return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


async def scenario(tmp: Path, holder: subprocess.Popen[bytes], result: dict[str, Any]) -> None:
    def probes(port: int) -> dict[str, str]:
        # The gateway's side cannot open a connection to the edge: not to the address it advertised,
        # not to "its" loopback (that is A's own), while the edge reached A (join, heartbeats, tunnel).
        return {"direct_to_advertised": connects(B, port), "direct_to_loopback": connects("127.0.0.1", port)}

    async with tunnel_cluster(tmp, host=A) as cluster:
        await serve_edge_in_namespace(
            cluster, tmp, holder.pid, result, host="127.0.0.1", advertise=B,
            what="the edge in namespace B routable through its tunnel",
            inputs=["across namespaces", "via the tunnel"], probes=probes)


def main() -> None:
    result: dict[str, Any] = {}
    holder = make_namespace_b()
    try:
        result["veth"] = True
        asyncio.run(scenario(Path(tempfile.mkdtemp(prefix="gazsi-netns-")), holder, result))
    finally:
        holder.kill()
        print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
