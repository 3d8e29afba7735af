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
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.tunnel import tunnel_cluster, until

A, B = "10.77.0.1", "10.77.0.2"
MODEL = "all-MiniLM-L6-v2"


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
    async with tunnel_cluster(tmp, host=A) as cluster:
        cmd = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", sys.executable, "-m", "gazsi_cli.main",
               "--log-level", "warning", "edge", "serve", "--data-dir", str(tmp / "edge"), "--host", "127.0.0.1",
               "--port", "0", "--dataplane", "fast", "--workers", "1", "--no-auth", "--advertise", B,
               *cluster.edge_args()]
        # Popen returns at once; its output is read off the loop (to_thread) while the control plane answers.
        edge = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,  # noqa: ASYNC220
                                env=dict(os.environ, GAZSI_ENGINE__ONNX_THREADS="1"))
        assert edge.stdout is not None
        lines: list[str] = []
        try:
            port = None
            while port is None:
                line = await asyncio.to_thread(edge.stdout.readline)
                if not line:
                    break
                lines.append(line)
                m = re.search(r"serving on https?://[\d.]+:(\d+)", line)
                port = int(m[1]) if m else None
            result["edge_port"] = port
            if port is None:
                return

            async def routed() -> str | None:
                return next((n.node_id for n in cluster.gateway.table().nodes if n.url.startswith("tunnel://")), None)

            started = time.monotonic()
            node_id = await until(routed, 120, "the edge in namespace B routable through its tunnel", step_s=0.1)
            result["routable_after_s"] = round(time.monotonic() - started, 1)
            facts = cluster.server.cp.registry.get(node_id).facts
            result["table_url"] = cluster.server.cp.table.by_id[node_id].url
            result["facts_address"], result["reach"] = facts.address, facts.reach
            result["tunnel_ids"] = sorted(cluster.hub.tunnels)
            result["node_id"] = node_id
            # The gateway's side cannot open a connection to the edge: not to the address it advertised,
            # not to "its" loopback (that is A's own), while the edge reached A (join, heartbeats, tunnel).
            result["direct_to_advertised"] = connects(B, port)
            result["direct_to_loopback"] = connects("127.0.0.1", port)
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.post(cluster.gateway_url + "/v1/embeddings",
                                    json={"model": MODEL, "input": ["across namespaces", "via the tunnel"]})
                result["via_gateway"] = {"status": r.status_code,
                                         "dims": [len(d["embedding"]) for d in r.json().get("data", [])]}
                codes = [(await http.post(cluster.gateway_url + "/v1/embeddings",
                                          json={"model": MODEL, "input": f"n {i}"})).status_code for i in range(20)]
                result["more_codes"] = sorted(set(codes))
                edge.send_signal(signal.SIGKILL)
                killed = time.monotonic()

                async def gone() -> bool | None:
                    return True if node_id not in cluster.gateway.table().by_id else None

                await until(gone, 10, "the killed edge out of the gateway's routing", step_s=0.005)
                result["left_table_ms"] = round((time.monotonic() - killed) * 1000)
                after = await http.post(cluster.gateway_url + "/v1/embeddings", json={"model": MODEL, "input": "x"})
                result["after_kill"] = {"status": after.status_code, "body": after.json()}
        finally:
            if edge.poll() is None:
                edge.kill()
            edge.wait(10)
            result["edge_lines"] = lines[-8:]


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
