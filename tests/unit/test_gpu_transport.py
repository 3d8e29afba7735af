"""The gpu transport's CPU pieces, without sockets or a GPU: TLS refusal, header splice, head parse, builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_node.encode import inference_body
from edge_node.pages import CONTACTS_HTML, INDEX_HTML
from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu._head import hot_headers, needs_cpu_query, parse_head
from edge_node.transports.gpu.cpu_path import with_headers
from edge_node.transports.gpu.kernels import jobs_for
from edge_node.transports.gpu.transport import GpuTransport
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import ConfigError, HeadersTooLarge, InvalidRequest
from gazsi_cluster.http.wire import HttpReply, render, render_head
from tests.support.gpu_plane import ReferenceDevice, build_reference

pytestmark = pytest.mark.unit


def _tls_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    from gazsi_cluster.tls import create_deployment_certs

    certs = create_deployment_certs(tmp_path / "tls")
    return load_settings(data_dir=str(tmp_path), engine={"backend": "fake"}, edge={
        "dataplane": "gpu", "tls": {"certfile": str(certs.server_cert), "keyfile": str(certs.server_key)}})


def test_gpu_transport_refuses_tls_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot serve TLS: its CUDA kernels parse and build plaintext HTTP"):
        GpuTransport(SimpleNamespace(settings=_tls_settings(tmp_path)))  # type: ignore[arg-type]


def test_a_node_on_the_gpu_plane_with_tls_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has no GPU, so the node would fall back to fast; pretend the hardware said gpu.
    import edge_node.node as node_module

    monkeypatch.setattr(node_module, "choose_dataplane", lambda requested: ("gpu", "test: a GPU is present"))
    with pytest.raises(ConfigError, match=r"edge\.tls is set but the gpu data plane cannot serve TLS"):
        node_module.EdgeNode(_tls_settings(tmp_path))


@pytest.mark.parametrize("keep", [True, False])
def test_spliced_headers_are_where_the_renderer_writes_them(keep: bool) -> None:
    body = b'{"input":"x"}'
    headers = [("X-RateLimit-Limit-Requests", "3"), ("X-Gazsi-Cache", "miss"), ("Server-Timing", "total;dur=1")]
    built = render(HttpReply(200, body), keep_alive=keep)  # what the build kernel writes (no extras)
    assert with_headers(built, headers) == render(HttpReply(200, body, headers), keep_alive=keep)
    head_only = render_head(HttpReply(200, body), keep_alive=keep)
    assert with_headers(head_only, headers) == render_head(HttpReply(200, body, headers), keep_alive=keep)
    assert with_headers(built, []) is built


def test_head_parse_counts_as_the_listener_and_refuses_alike() -> None:
    head = (b"POST /v1/embeddings?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nExpect: 100-continue\r\n"
            b"Authorization: Bearer a\r\nauthorization: Bearer b\r\n\r\n")
    p = parse_head(head, max_headers=100, max_header_bytes=16384)
    assert (p.method, p.path, p.query, p.content_length, p.keep_alive) == ("POST", "/v1/embeddings", "x=1", 12, True)
    assert p.expect_continue and p.headers["authorization"] == "Bearer b"  # the last one, as HttpListener
    assert not parse_head(b"GET / HTTP/1.0\r\n\r\n", max_headers=8, max_header_bytes=1024).keep_alive
    assert parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", max_headers=8,
                      max_header_bytes=1024).chunked
    with pytest.raises(HeadersTooLarge, match=r"\(8 fields, 1024 bytes\)"):
        parse_head(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 9 + b"\r\n", max_headers=8, max_header_bytes=1024)
    with pytest.raises(HeadersTooLarge):
        parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n", max_headers=8, max_header_bytes=1024)
    with pytest.raises(InvalidRequest, match="Invalid HTTP request"):
        parse_head(b"GET / HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n", max_headers=8, max_header_bytes=1024)
    with pytest.raises(InvalidRequest, match="protocol upgrades"):
        parse_head(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", max_headers=8,
                   max_header_bytes=1024)


def test_hot_headers_and_queries_python_reads_differently() -> None:
    head = (b"GET /inference?d=x HTTP/1.1\r\nCache-Control:  no-cache \r\nX-Gazsi-Timing: 0\r\n"
            b"x-gazsi-timing: 1\r\nX-Gazsi-Forwarded: n1\r\nX-Other: 1\r\n\r\n")
    assert hot_headers(head, "Bearer k") == {"authorization": "Bearer k", "cache-control": "no-cache",
                                             "x-gazsi-timing": "1", "x-gazsi-forwarded": "n1"}
    assert "upgrade" in hot_headers(b"GET /index. HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", None)
    for query, cpu in ((b"d=a+b%20c", False), (b"x=%41&d=y", False), (b"d%=y", True), (b"%64=y", True),
                       (b"d=y#frag", True), (b"a&d=y", False)):
        assert needs_cpu_query(query) is cpu, query


def test_reference_device_builds_what_the_renderer_writes() -> None:
    dev = ReferenceDevice(8)
    heads = [b"GET /inference?d=caf%C3%A9 HTTP/1.1\r\nConnection: close\r\n\r\n",
             b"HEAD /inference?d=x HTTP/1.1\r\n\r\n", b"GET /index. HTTP/1.1\r\n\r\n",
             b"HEAD /contacts. HTTP/1.0\r\n\r\n", b"GET /nope HTTP/1.1\r\n\r\n"]
    rows = dev.parse_admit(heads)
    assert [int(r[L.R_STATUS]) for r in rows] == [200, 200, 200, 200, 404]
    slots = [int(r[L.R_SLOT]) for r in rows]
    assert slots[0] >= 0 and slots[1] >= 0 and slots[2:] == [-1, -1, -1]
    canned = dev.build_canned(jobs_for(rows[2:4], [0, 0], [0, 0], [0, 0]))
    assert canned[0] == render(HttpReply(200, INDEX_HTML, content_type="text/html; charset=utf-8"), keep_alive=True)
    assert canned[1] == render_head(HttpReply(200, CONTACTS_HTML, content_type="text/html; charset=utf-8"),
                                    keep_alive=False)
    popped = dev.ring.pop_requests()
    assert popped == slots[:2]
    for slot in popped:
        dev.ring.take(slot)
        dev.ring.complete(slot, tokens=4, batch_size=2, inference_us=77, sample=[0.5, -0.25, 1e-7])
    built = dev.build_ring(2)
    sample = np.asarray([0.5, -0.25, 1e-7], dtype=np.float32)
    body = inference_body("café", 4, sample, 77, 2)
    assert dev.ring.response(built[0]) == render(HttpReply(200, body), keep_alive=False)
    assert dev.ring.response(built[1]) == render_head(HttpReply(200, inference_body("x", 4, sample, 77, 2)),
                                                      keep_alive=True)
    for slot in built:
        dev.ring.release(slot)
    assert dev.ring.counts()["FREE"] == L.RING_N


def test_reference_build_follows_the_kernel_layout() -> None:
    dev = ReferenceDevice(1)
    job = np.zeros(L.J_NFIELDS, dtype=np.int32)
    job[L.J_KIND], job[L.J_TOKENS], job[L.J_BATCH], job[L.J_KEEPALIVE] = 1, 3, 1, 1
    out = build_reference(job, [0.0, 1.0, float("nan")], b'q"\x01', dev.blob, dev.idx)
    assert out.endswith(b'{"input":"q\\"\\u0001","tokens":3,"embedding_sample":[0.000000,1.000000,null],'
                        b'"inference_time_us":0,"batch_size":1}')


def test_gpu_modules_import_without_cupy() -> None:
    # Every module of the package, in a fresh interpreter where importing cupy (or any CUDA binding) fails:
    # GPU code loads on first use only.
    code = (
        "import importlib, importlib.abc, pkgutil, sys\n"
        "class Deny(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('cupy', 'cupyx', 'cuda', 'torch', 'tensorrt', 'pycuda'):\n"
        "            raise ImportError('denied: ' + name)\n"
        "sys.meta_path.insert(0, Deny())\n"
        "import edge_node.transports.gpu as pkg\n"
        "names = [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert int(out.stdout) >= 9  # server, device, feed, ring, kernels, control, _head, _layout, _reference


def test_device_module_loads_cupy_only_when_used() -> None:
    # The same guard, shown to bite: the CUDA device asks for cupy when it is made, not before.
    code = ("import sys; sys.modules['cupy'] = None\n"
            "from edge_node.transports.gpu.device import CudaDevice\n"
            "try:\n    CudaDevice(8)\nexcept ImportError:\n    print('lazy')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert out.stdout.strip() == "lazy"


def test_the_stage_table_keeps_the_most_recent_slots_and_their_release_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_node.transports.gpu import stages as stage_module

    monkeypatch.setattr(stage_module, "RECENT_MARKS", 100)
    table = stage_module.StageTable()
    ring = ReferenceDevice(8).ring
    ts = ring.v.ts
    for k in range(250):  # 2.5 times round the circle: only the last 100 slots count
        slot = ring.pop(L.Q_FREE)
        assert slot is not None
        ring.v.state[slot] = L.S_CONSUMED  # its response written, as the build loop finds it
        ts[slot, :7] = np.arange(7, dtype=np.uint64) * 1000 * (k + 1) + 1
        table.finish(ring, slot, ring.release)
        kept = table.marks[k % 100]
        assert int(kept[8]) == int(ts[slot, 8]) >= int(kept[7]) > 0  # T8 is release's stamp, after T7
        ts[slot, 2] = 0  # the GPU admits the free slot again: the kept copy does not change
        assert int(kept[2]) == 2000 * (k + 1) + 1
    stages = table.summary()
    assert stages["slots"]["n"] == 100
    # T0->T1 of slot k is (k+1) us; the last 100 are k = 150..249: nearest ranks 49 and 98 of 151..250.
    assert stages["T0-T1 head to burst launch"] == {"p50": 200.0, "p99": 249.0}
    assert 0 <= stages["T7-T8 release"]["p50"] < 1_000_000
    # Only slots released within the window: a quiet spell after a busy one is not read as the busy one.
    table.marks[:60, 8] -= 10 * 10**9  # 60 of the kept slots released ten seconds earlier
    assert table.summary()["slots"]["n"] == 40
    assert table.summary(window_s=60)["slots"]["n"] == 100
    table.marks[:, 8] -= 10 * 10**9
    assert table.summary() == {}


class _Event:
    """A GPU event that completes after ``polls`` queries (or when waited for)."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    @property
    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def synchronize(self) -> None:
        self.polls = -1


async def test_a_small_burst_polls_on_the_loop_before_a_thread_waits() -> None:
    from edge_node.transports.gpu import server
    from edge_node.transports.gpu.device import Launched

    plane = server.GpuDataplane(SimpleNamespace(), poll_us=200_000)  # type: ignore[arg-type]
    waits = plane.waits
    waits.start()
    try:
        # Small: polled on the loop until done (no thread); large: after one loop turn, waited for in the thread.
        assert await waits.result(Launched(lambda: "small", _Event(polls=50)), small=True) == "small"  # type: ignore[arg-type]
        assert plane.stats["gpu_waits_off_loop"] == 0
        assert await waits.result(Launched(lambda: "large", _Event(polls=50))) == "large"  # type: ignore[arg-type]
        assert plane.stats["gpu_waits_off_loop"] == 1
        # The poll is bounded: past gpu_poll_us the wait still goes to the thread.
        waits.poll_ns = 1_000
        assert await waits.result(Launched(lambda: "slow", _Event(polls=10**9)), small=True) == "slow"  # type: ignore[arg-type]
        assert plane.stats["gpu_waits_off_loop"] == 2 and plane.stats["gpu_waits"] == 3
    finally:
        waits.stop()
