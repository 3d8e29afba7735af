"""The GPU data plane on a machine without a GPU: its device half replaced by the CPU references of the kernels.

:class:`ReferenceDevice` implements :class:`edge_node.transports.gpu.device.HttpDevice` with

* ``gz_parse``: :func:`edge_node.transports.gpu._reference.parse_reference` (the kernel is held to it on a
  GPU by ``tests/gpu/test_gpu_http.py``, its C helpers on the host by ``tests/unit/test_gpu_http_reference.py``);
* ``gz_ring_admit`` / ``gz_ring_build``: :class:`tests.support.gpu_ring.EmulatedGpuSide` on a numpy ring;
* ``gz_build_one``: :func:`build_reference`, the kernel's response layout over the canned table and
  :func:`edge_node.encode.inference_body` (the kernel's JSON is held to that body on a GPU).

Everything else is the real transport: the feed, the limits, the routing between the kernels' hot path
and the CPU, the pipeline. ``python -m tests.support.gpu_plane --data-dir D --port 0`` serves such a plane
the way ``gazsi edge serve`` would, printing the same "serving on" line, so the transport parity table
(``tests/integration/edge/test_parity.py``) runs against it next to the real transports.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from edge_node.encode import inference_body
from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu._reference import ParsedRequest, parse_reference
from edge_node.transports.gpu.device import Launched
from edge_node.transports.gpu.kernels import canned_table
from edge_node.transports.gpu.ring import HostRing
from tests.support.gpu_ring import EmulatedGpuSide

if TYPE_CHECKING:
    from gazsi_cluster.config import Settings

__all__ = ["ReferenceDevice", "build_reference", "reference_row"]


def reference_row(p: ParsedRequest) -> np.ndarray:
    """The result row ``gz_parse`` writes for what the reference parser read (R_SLOT still -1)."""
    row = np.zeros(L.NFIELDS, dtype=np.int32)
    row[[L.R_SLOT, L.R_D_LEN, L.R_AUTH_OFF, L.R_AUTH_LEN, L.R_CLEN]] = -1
    row[L.R_STATUS], row[L.R_HEAD_LEN] = p.status, p.head_len
    row[L.R_ROUTE], row[L.R_METHOD], row[L.R_VERSION] = p.route, p.method, p.version
    row[L.R_PATH_OFF], row[L.R_PATH_LEN] = p.path
    row[L.R_QUERY_OFF], row[L.R_QUERY_LEN] = p.query
    row[L.R_CLEN], row[L.R_KEEPALIVE], row[L.R_NHEADERS] = p.content_length, int(p.keep_alive), p.header_count
    if p.authorization is not None:
        row[L.R_AUTH_OFF], row[L.R_AUTH_LEN] = p.authorization
    if p.d is not None:
        row[L.R_D_LEN] = len(p.d)
    return row


def build_reference(job: np.ndarray, sample: Sequence[float], d: bytes, blob: bytes, idx: np.ndarray) -> bytes:
    """``gz_build_one``: the canned prefix, content-length, connection, then the canned body or the JSON."""
    c = int(job[L.J_CANNED])
    pre_off, pre_len, body_off, body_len = (int(x) for x in idx[4 * c:4 * c + 4])
    if int(job[L.J_KIND]) == 1:
        body = inference_body(d.decode("utf-8"), int(job[L.J_TOKENS]), sample, int(job[L.J_INFER_US]),
                              int(job[L.J_BATCH]))
    else:
        body = blob[body_off:body_off + body_len]
    out = blob[pre_off:pre_off + pre_len] + b"content-length: %d" % len(body)
    out += b"\r\n\r\n" if int(job[L.J_KEEPALIVE]) else b"\r\nconnection: close\r\n\r\n"
    return out if int(job[L.J_HEADONLY]) else out + body


class ReferenceDevice:
    """The kernels' side of the GPU data plane, on the CPU (see the module docstring)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.ring = HostRing(np.zeros(L.RING_BYTES, dtype=np.uint8))
        self.gpu = EmulatedGpuSide(self.ring.v)
        self.blob, self.idx = canned_table()
        self.closed = False

    def launch_parse_admit(self, heads: Sequence[bytes]) -> Launched[np.ndarray]:
        rows = self.parse_admit(heads)
        return Launched(lambda: rows)

    def launch_build_ring(self, n: int) -> Launched[list[int]]:
        built = self.build_ring(n)
        return Launched(lambda: built)

    def parse_admit(self, heads: Sequence[bytes]) -> np.ndarray:
        if len(heads) > self.capacity:
            raise ValueError(f"burst of {len(heads)} exceeds capacity {self.capacity}")
        rows = np.zeros((len(heads), L.NFIELDS), dtype=np.int32)
        for i, head in enumerate(heads):
            p = parse_reference(head)
            rows[i] = reference_row(p)
            if p.status == 200 and p.route == L.ROUTE_INFERENCE and p.d is not None:
                rows[i, L.R_SLOT] = self.gpu.admit(p.d, keep_alive=p.keep_alive, head_only=p.method == 2, tag=i)
        return rows

    def build_canned(self, jobs: np.ndarray) -> list[bytes]:
        return [build_reference(job, (0.0, 0.0, 0.0), b"", self.blob, self.idx) for job in jobs]

    def build_ring(self, n: int) -> list[int]:
        v, built = self.ring.v, []
        for _ in range(n):
            slot = self.gpu.pop(L.Q_RESPONSE)
            if slot is None or not self.gpu.move(slot, L.S_RESULT_READY, L.S_CONSUMED):
                built.append(-1)
                continue
            job = v.param[slot, :L.J_NFIELDS]
            out = build_reference(job, v.sample[slot, :3].tolist(), v.d[slot, :int(job[L.J_DLEN])].tobytes(),
                                  self.blob, self.idx)
            v.out[slot, :len(out)] = np.frombuffer(out, dtype=np.uint8)
            v.out_len[slot] = len(out)
            v.ts[slot, 6] = time.perf_counter_ns()  # the kernel's T6 (its clock is %globaltimer)
            built.append(slot)
        return built

    def close(self) -> None:
        self.closed = True


async def _serve(args: argparse.Namespace) -> None:
    from edge_node.node import EdgeNode
    from edge_node.transports.gpu.transport import GpuTransport
    from gazsi_cluster.config import load_settings

    overrides: dict[str, object] = {"edge": {"dataplane": "asgi", "port": 0, "host": "127.0.0.1"}}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.backend:
        overrides["engine"] = {"backend": args.backend}
    if args.no_auth:
        overrides["auth"] = {"enabled": False}
    settings = load_settings(**overrides)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.workers:
        await _serve_feeds(args, settings, stop)
        return
    # The node's own transport (asgi) serves the operator routes; the gpu transport runs on the node's
    # pipeline, authorizer, cache and metrics, as EdgeNode wires it on a GPU machine.
    async with EdgeNode(settings) as node:
        gpu = GpuTransport(node, device=ReferenceDevice)
        await gpu.start()
        try:
            print(f"gpu-reference: serving on http://127.0.0.1:{gpu.port}; operator app (/readyz, /metrics) "
                  f"on port {node.port}", flush=True)
            await stop.wait()
        finally:
            await gpu.stop(settings.batcher.request_timeout_s)


async def _serve_feeds(args: argparse.Namespace, settings: Settings, stop: asyncio.Event) -> None:
    """``edge.dataplane: gpu`` with ``--workers`` feed processes, as on a GPU machine but for the kernels."""
    from edge_node import node as node_module

    # The hardware probe would find no GPU and fall back to fast: this node has "GPU kernels" (their references).
    node_module.choose_dataplane = lambda requested: ("gpu", "the kernels' CPU references (tests)")
    settings = settings.model_copy(update={"edge": settings.edge.model_copy(update={
        "dataplane": "gpu", "gpu_feed": "workers", "workers": args.workers})})
    async with node_module.EdgeNode(settings, worker_module="tests.support.gpu_worker") as node:
        print(f"gpu-reference: serving on http://127.0.0.1:{node.port}; operator app (/readyz, /metrics) "
              f"on port {node.admin_port}; {args.workers} feed processes", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the gpu transport over the CPU references of its kernels")
    parser.add_argument("--data-dir")
    parser.add_argument("--port", type=int, default=0, help="ignored: always a free port")
    parser.add_argument("--backend")
    parser.add_argument("--no-auth", action="store_true")
    parser.add_argument("--workers", type=int, default=0,
                        help="gpu feed processes (edge.gpu_feed=workers); 0: the plane in this process")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
