"""The ring on real mapped memory, and the ``gpu`` data plane against the socket data plane (skipped without a GPU)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from edge_node.dataplane.gpu import _layout as L

cp = pytest.importorskip("cupy", reason="CuPy is not installed (GPU data plane tests need a CUDA GPU)")
try:
    _N_GPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _N_GPU = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_N_GPU == 0, reason="no CUDA GPU on this machine")]


@pytest.mark.timeout(120)
def test_ring_under_concurrent_gpu_producers_consumers_and_cpu_owner() -> None:
    from edge_node.dataplane.gpu.control import MappedBuffer
    from edge_node.dataplane.gpu.ring import HostRing
    from edge_node.dataplane.gpu.server import _ring_module

    mem = MappedBuffer(L.RING_BYTES)
    ring = HostRing(mem.array)
    d_ring = mem.device_array(cp.uint8, (L.RING_BYTES,))
    done = MappedBuffer(16, np.uint32)
    done.array[:] = 0
    producers, per_thread, consumers = 256, 40, 64
    total = producers * per_thread
    kernel = _ring_module().get_function("gz_ring_stress")
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


def _model_dir() -> Path | None:
    for cand in (Path(".carry/model"),):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def _runtime(tmp_path: Path):  # type: ignore[no-untyped-def]
    from edge_node.engines.fake import FakeEngine
    from edge_node.runtime import EdgeRuntime
    from gazsi_cluster.config import load_settings

    engine: dict[str, object] = {"backend": "fake"}
    if _model_dir() is not None:
        engine["model_dir"] = str(_model_dir())
    # No response cache: both planes must run the engine for every request to compare bodies.
    settings = load_settings(data_dir=tmp_path, engine=engine, cache={"enabled": False})
    return EdgeRuntime(settings, engine=FakeEngine())


_NUM = re.compile(rb'"inference_time_us":(\d+)')


@pytest.mark.timeout(120)
async def test_gpu_plane_bodies_equal_socket_plane_bodies(tmp_path: Path) -> None:
    import httpx

    from edge_node.dataplane.gazsi_json import inference_body
    from edge_node.dataplane.gpu.server import GpuDataplane
    from edge_node.dataplane.socket.app import create_app
    from tests.support.asgi import serve_on_loopback

    runtime = _runtime(tmp_path)
    await runtime.start(wait=True)
    plane = GpuDataplane(runtime, capacity=256)
    plane.start()
    await plane.serve("127.0.0.1", 0)
    texts = ["hello world", 'quote " back\\slash', "ctrl \x01\x1f\t", "naïve 日本語 😀", "x" * 1500, "a+b=c&d"]
    try:
        async with serve_on_loopback(create_app(runtime, manage_lifespan=False)) as url, \
                httpx.AsyncClient(base_url=url, timeout=30) as sock_c, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{plane.port}", timeout=30) as gpu_c:
            for text in texts:
                target = f"/inference?d={quote(text, safe='')}"
                a, b = await sock_c.get(target), await gpu_c.get(target)
                assert (a.status_code, b.status_code) == (200, 200), (text, b.content[:200])
                # inference_time_us is a measured duration and differs run to run; all else is byte-equal.
                assert _NUM.sub(b"#", a.content) == _NUM.sub(b"#", b.content), (a.content, b.content)
                got = b.json()
                assert got["input"] == text and got["batch_size"] == 1
                vec = runtime.engine.embed_sequences(runtime.service.tokenizer.encode([text]))[0]
                assert b.content == inference_body(text, got["tokens"], vec[:3], got["inference_time_us"], 1)
            for path in ("/index.", "/contacts.", "/nope", "/inference"):
                a, b = await sock_c.get(path), await gpu_c.get(path)
                assert a.status_code == b.status_code, path
                if path != "/inference":
                    assert a.content == b.content, path
                else:  # missing d: 400 on both, the messages differ (the kernel does not say why)
                    assert b.json()["error"]["type"] == a.json()["error"]["type"] == "invalid_request_error"
            # A broken escape: the kernel (strict, as the reference parser) says 400; Starlette's
            # query parsing keeps "%ZZ" literally and the socket path embeds it (a known difference).
            bad = await gpu_c.get("/inference?d=%ZZ")
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
            a, b = await sock_c.put("/index."), await gpu_c.put("/index.")
            assert a.status_code == b.status_code == 405 and a.content == b.content
            head = await gpu_c.head(f"/inference?d={quote('hi')}")
            assert head.status_code == 200 and head.content == b""

            # Many concurrent clients: more requests than ring slots. Each gets its own answer
            # (or a fast 429 when every slot is busy), and the ring ends clean.
            async def one(i: int) -> tuple[int, bytes]:
                r = await gpu_c.get(f"/inference?d=item%20{i}")
                return r.status_code, r.content

            gpu_c2 = httpx.AsyncClient(base_url=f"http://127.0.0.1:{plane.port}", timeout=30,
                                       limits=httpx.Limits(max_connections=300))
            async with gpu_c2:
                gpu_c = gpu_c2
                replies = await asyncio.gather(*[one(i) for i in range(600)])
            ok = [(i, body) for i, (st, body) in enumerate(replies) if st == 200]
            assert all(st in (200, 429) for st, _ in replies)
            assert len(ok) >= 300
            for i, body in ok:
                assert body.startswith(b'{"input":"item %d"' % i)
        counts = plane.ring.counts()
        assert counts["errors"] == 0 and counts["FREE"] == L.RING_N
        assert plane.stats["bursts"] < plane.stats["requests"]  # heads really shared launches
    finally:
        await plane.stop()
        await runtime.stop()
