"""The gpu transport's request path on a CPU: the real feed, limits, hot-path/CPU split and pipeline, with the
CUDA kernels replaced by their CPU references (``tests/support/gpu_plane.py``).

Each test runs one node and, on the node's own pipeline, two listeners: the gpu transport and
:class:`~gazsi_cluster.http.listener.HttpListener` (what every fast-front worker serves with). The same
exchange must bring back the same bytes from both: auth, per-key limits, the response cache, Server-Timing,
the listener limits, disconnects. (The parity table with the ONNX engine is ``test_parity.py``.)
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu.device import HttpDevice, Launched
from edge_node.transports.gpu.transport import GpuTransport
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.auth.keys import display_prefix
from gazsi_cluster.config import load_settings
from gazsi_cluster.http.listener import HttpListener, bind_socket
from tests.support.edge import running_node
from tests.support.gpu_plane import ReferenceDevice
from tests.support.parity import comparable, exchange

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
MODEL = "all-MiniLM-L6-v2"


class Planes:
    def __init__(self, node: EdgeNode, gpu: GpuTransport, listener_port: int) -> None:
        self.node, self.gpu, self.listener_port = node, gpu, listener_port

    @property
    def urls(self) -> dict[str, str]:
        return {"gpu": f"http://127.0.0.1:{self.gpu.port}", "listener": f"http://127.0.0.1:{self.listener_port}"}

    async def both(self, raw: bytes | dict[str, bytes]) -> dict[str, bytes]:
        """The exchange on each listener (``raw`` per listener where requests must differ)."""
        out = {}
        for name, url in self.urls.items():
            out[name] = await asyncio.to_thread(exchange, url, raw[name] if isinstance(raw, dict) else raw)
        return out

    @property
    def stats(self) -> dict[str, int]:
        assert self.gpu.plane is not None
        return self.gpu.plane.stats

    def ring_is_clean(self) -> bool:
        assert self.gpu.plane is not None
        counts = self.gpu.plane.ring.counts()
        return counts["errors"] == 0 and counts["FREE"] == L.RING_N


@asynccontextmanager
async def planes(tmp_path: Path, device: Callable[[int], HttpDevice] = ReferenceDevice,
                 **settings: Any) -> AsyncIterator[Planes]:
    async with running_node(tmp_path, dataplane="asgi", **settings) as node:
        assert node.pipeline is not None
        gpu = GpuTransport(node, device=device)
        await gpu.start()
        pipeline = node.pipeline
        listener = HttpListener(pipeline.handle, node.settings.limits, max_body=lambda: pipeline.max_body_bytes)
        await listener.start(bind_socket("127.0.0.1", 0))
        try:
            yield Planes(node, gpu, listener.servers[0].sockets[0].getsockname()[1])
        finally:
            await listener.stop(2)
            await gpu.stop(2)


def same(answers: dict[str, bytes], *, swap: tuple[bytes, bytes] | None = None) -> bytes:
    """Assert both listeners sent the same bytes (``swap``: the gpu's text -> the listener's); the gpu's answer."""
    gpu, ref = answers["gpu"], answers["listener"]
    if swap is not None:
        gpu = gpu.replace(*swap)
    assert comparable(gpu)[0] == comparable(ref)[0], (gpu[:700], ref[:700])
    return answers["gpu"]


async def _get_once(port: int, path: str, limit_s: float) -> bytes:
    """``GET path`` on a connection of its own (``Connection: close``): everything the plane sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get(path))
    try:
        return await asyncio.wait_for(reader.read(), limit_s)
    finally:
        writer.close()


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    """One response with a Content-Length body from a kept-alive connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"\r\ncontent-length: ", 1)[1].split(b"\r\n", 1)[0])
    return head + await reader.readexactly(length)


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: e\r\n{extra}Connection: close\r\n\r\n".encode()


@pytest.mark.parametrize("build", ["gpu", "cpu"])
async def test_hot_path_carries_auth_limits_cache_and_timing(tmp_path: Path, build: str) -> None:
    authorizer = build_authorizer(load_settings(data_dir=str(tmp_path), auth={"key_env": "test"}))
    async with planes(tmp_path, engine=FakeEngine(), authorizer=authorizer, auth={"key_env": "test"},
                      cache={"enabled": True}, edge={"gpu_build": build}) as p:
        keys = {name: (await authorizer.admin.create(name=name, rpm=3)).key for name in ("gpu", "listener")}
        text = {"gpu": "apple", "listener": "house"}  # the cache is shared: each listener its own input

        def req(name: str, *headers: str) -> bytes:
            return get(f"/inference?d={text[name]}", f"Authorization: Bearer {keys[name]}", *headers)

        first = same(await p.both({n: req(n) for n in keys}), swap=(b"apple", b"house"))
        assert first.startswith(b"HTTP/1.1 200") and b"x-ratelimit-remaining-requests: 2" in first
        assert b"x-gazsi-cache: miss" in first
        second = same(await p.both({n: req(n, "X-Gazsi-Timing: 1") for n in keys}), swap=(b"apple", b"house"))
        assert b"x-gazsi-cache: hit" in second and b"server-timing: tokenize;dur=" in second
        third = same(await p.both({n: req(n, "Cache-Control: no-cache") for n in keys}), swap=(b"apple", b"house"))
        assert third.startswith(b"HTTP/1.1 200") and b"x-gazsi-cache: hit" not in third
        # The refusal names the key by its display prefix: each listener its own key.
        prefixes = (display_prefix(keys["gpu"]).encode(), display_prefix(keys["listener"]).encode())
        refused = same(await p.both({n: req(n) for n in keys}), swap=prefixes)
        assert refused.startswith(b"HTTP/1.1 429") and b"retry-after: " in refused
        # No key, a bogus key, HEAD: the same refusals.
        no_key = same(await p.both(get("/inference?d=x")))
        assert no_key.startswith(b"HTTP/1.1 401") and b"www-authenticate: Bearer" in no_key
        same(await p.both(get("/inference?d=x", "Authorization: Bearer gz_test_" + "A" * 43)))
        head = same(await p.both(b"HEAD /inference?d=x HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n"))
        assert head.endswith(b"\r\n\r\n") and head.startswith(b"HTTP/1.1 401")
        # /v1/embeddings on the gpu plane: through the same pipeline (auth, usage) from the CPU path.
        body = b'{"input": "hello", "model": "%s"}' % MODEL.encode()
        post = {n: b"POST /v1/embeddings HTTP/1.1\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (keys[n].encode(), len(body), body) for n in keys}
        assert same(await p.both(post), swap=prefixes).startswith(b"HTTP/1.1 429")  # the key's 3 requests are spent
        # Both halves of the plane served; with edge.gpu_build=cpu the hot answers were rendered without a build.
        assert (p.stats["built"] >= 3 if build == "gpu" else p.stats["built"] == 0) and p.stats["cpu"] >= 1, p.stats
        metrics = p.node.request_metrics.render().decode()
        assert 'gazsi_requests_total{route="/inference",status="200"} 6.0' in metrics
        assert 'gazsi_requests_total{route="/inference",status="429"} 2.0' in metrics
        assert p.ring_is_clean()


async def test_pages_errors_and_odd_heads_alike(tmp_path: Path) -> None:
    async with planes(tmp_path, engine=FakeEngine(), cache={"enabled": False}) as p:
        for raw in (get("/index."), get("/contacts.?x=1"), get("/nope"), get("/inference"), get("/inference?d="),
                    get("/inference?d=%ZZ"), get("/inference?d=%C3%28"), get("/inference?d=" + "a" * 3000),
                    get("/inference?%64=x"), get("/inference?d=a#b"), get("/healthz"), get("/v1/models"),
                    get("/inference?d=x", "Authorization: Bearer a", "Authorization: Bearer b"),
                    b"PUT /index. HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /index. HTTP/1.1\r\nConnection: close\r\n\r\n",
                    b"GET /inference?d=keep HTTP/1.1\r\n\r\nGET /inference?d=alive HTTP/1.0\r\n\r\n",
                    b"GET /x HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
                    b"GET /x HTTP/2.0\r\n\r\n", b"GET x HTTP/1.1\r\n\r\n", b"\r\nGET /index. HTTP/1.1\r\nConnection: close\r\n\r\n"):
            same(await p.both(raw))
        metrics = p.node.request_metrics.render().decode()
        assert 'gazsi_requests_total{route="/index.",status="200"} 6.0' in metrics  # three each way
        assert p.ring_is_clean()


async def test_chunked_request_bodies_are_refused_saying_why(tmp_path: Path) -> None:
    async with planes(tmp_path, engine=FakeEngine()) as p:
        raw = (b"POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\n\r\n")
        got = await asyncio.to_thread(exchange, p.urls["gpu"], raw)  # (the CPU listeners serve it)
        assert got.startswith(b"HTTP/1.1 400") and b"chunked request bodies" in got and b"connection: close" in got


async def test_listener_limits_come_from_the_config(tmp_path: Path) -> None:
    limits = {"max_connections_per_client": 2, "header_timeout_s": 0.3, "keep_alive_timeout_s": 0.5,
              "max_headers": 8, "max_header_bytes": 1024, "max_body_bytes": 2048}
    async with planes(tmp_path, engine=FakeEngine(), limits=limits) as p:
        # 431: more fields, or more bytes, than configured (both within what a kernel slot takes).
        same(await p.both(get("/inference?d=x", *[f"X-{i}: 1" for i in range(8)])))
        same(await p.both(get("/inference?d=x", *[f"X-{i}: 1" for i in range(7)])))
        too_big = same(await p.both(get("/inference?d=x", "X-Big: " + "b" * 1100)))
        assert too_big.startswith(b"HTTP/1.1 431") and b"(8 fields, 1024 bytes)" in too_big
        # 413: a body over max_body_bytes, read and dropped, then the connection closes.
        big = same(await p.both(b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 3000\r\n\r\n" + b"x" * 3000))
        assert big.startswith(b"HTTP/1.1 413") and b"connection: close" in big
        # 408: a head that does not complete in time.
        slow = same(await p.both(b"GET /inference?d=slow HTTP/1.1\r\nHost:"))
        assert slow.startswith(b"HTTP/1.1 408")
        # An idle keep-alive connection is closed after keep_alive_timeout_s, silently.
        idle = same(await p.both(b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert idle.startswith(b"HTTP/1.1 200") and idle.count(b"HTTP/1.1") == 1
        # The per-client cap: the third open connection from one address gets 429 and is closed.
        for name, url in p.urls.items():
            port = int(url.rsplit(":", 1)[1])
            held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            try:
                await asyncio.sleep(0.05)
                third = await asyncio.to_thread(exchange, url, b"")
                assert third.startswith(b"HTTP/1.1 429") and b"(limit 2)" in third, (name, third)
            finally:
                for s in held:
                    s.close()
        # Limits changed at run time reach the gpu plane's new connections (EdgeNode.apply_limits calls
        # this on the node's own transport; here the gpu transport is a second one, so the test calls it).
        p.gpu.apply_limits(p.node.settings.limits.model_copy(update={"max_headers": 100}))
        ok = await asyncio.to_thread(exchange, p.urls["gpu"], get("/inference?d=x", *[f"X-{i}: 1" for i in range(8)]))
        assert ok.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("build", ["gpu", "cpu"])
async def test_more_requests_than_ring_slots_all_answered(tmp_path: Path, build: str) -> None:
    batcher = {"max_batch_size": 8, "queue_capacity": 1024}
    # 128 slots drain in 16 batches of 50 ms: the 129th request waits ~0.8 s for a slot, longer than the
    # default edge.gpu_slot_wait_s (0.5 s). Here every request may wait; the bound has its own test below.
    async with planes(tmp_path, engine=FakeEngine(delay_s=0.05), cache={"enabled": False}, batcher=batcher,
                      edge={"gpu_slot_wait_s": 30, "gpu_build": build}) as p:
        n = L.RING_N + 72

        replies = await asyncio.gather(*[_get_once(p.gpu.port, f"/inference?d=item+{i}", 60) for i in range(n)])
        for i, r in enumerate(replies):
            assert r.startswith(b"HTTP/1.1 200"), r[:300]
            assert b'{"input":"item %d"' % i in r
        # Past 128 in flight the ring had no slot: those waited for one, none was refused or sent to the CPU.
        assert p.stats["ring_full"] > 0 and p.stats["waited"] > 0, p.stats
        assert p.stats["built"] == (n if build == "gpu" else 0), p.stats
        assert p.stats["cpu"] == 0 and p.stats["expired"] == 0, p.stats
        assert p.ring_is_clean()
        # The ring's own stamps give the per-stage table (/readyz): every slot that served is in it, the
        # FakeEngine's 50 ms is the inference stage, and the stages add up to no more than the total.
        stages = p.gpu.readiness()["gpu_stages_us"]
        assert stages["slots"]["n"] == n
        assert 45_000 <= stages["T4-T5 inference"]["p50"] < 1_000_000, stages
        cpu_parts = ("T0-T1 head to burst launch", "T1-T3 admit kernel to CPU take", "T3-T4 wait for a batch",
                     "T4-T5 inference", "T5-T7 answer built and written", "T7-T8 release")
        assert all(stages[k]["p50"] >= 0 for k in cpu_parts), stages
        assert stages["T4-T5 inference"]["p50"] <= stages["T0-T8 total (CPU)"]["p50"], stages
        # The GPU clock's span ends at the build kernel's stamp: none without a build (no stale stamp either).
        assert ("T2-T6 on the GPU clock: ready to built" in stages) == (build == "gpu"), stages


async def test_a_request_that_waits_too_long_for_a_slot_gets_429_and_keeps_its_connection(tmp_path: Path) -> None:
    # 128 slots held by a slow engine (batch 1, 0.3 s per call): requests past them wait 0.2 s at most.
    engine = FakeEngine(delay_s=0.3)
    batcher = {"max_batch_size": 128, "max_wait_us": 0, "queue_capacity": 1024}
    async with planes(tmp_path, engine=engine, cache={"enabled": False}, batcher=batcher,
                      edge={"gpu_slot_wait_s": 0.2}) as p:
        n = L.RING_N + 20

        async def one(i: int) -> tuple[bytes, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.gpu.port)
            try:
                writer.write(f"GET /inference?d=item+{i} HTTP/1.1\r\nHost: e\r\n\r\n".encode())
                first = await asyncio.wait_for(_read_reply(reader), 30)
                writer.write(get("/index."))  # the connection still serves
                return first, await asyncio.wait_for(reader.read(), 30)
            finally:
                writer.close()

        started = asyncio.get_running_loop().time()
        replies = await asyncio.gather(*[one(i) for i in range(n)])
        statuses = [r.split(b" ", 2)[1] for r, _ in replies]
        assert statuses.count(b"429") >= 10 and statuses.count(b"200") >= L.RING_N - 8, statuses
        refused = next(r for r, _ in replies if r.split(b" ", 2)[1] == b"429")
        assert b"\r\nretry-after: 1\r\n" in refused.lower() and b'"code":"overloaded"' in refused
        assert all(after.startswith(b"HTTP/1.1 200") for _, after in replies)
        # The refusals came at their deadline, not after the work ahead of them.
        assert asyncio.get_running_loop().time() - started < 5
        assert p.stats["expired"] == statuses.count(b"429") and p.stats["cpu"] == 0, p.stats
        assert p.ring_is_clean()


async def test_past_the_queue_bound_requests_get_429_at_once(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.3)
    async with planes(tmp_path, engine=engine, cache={"enabled": False}, batcher={"max_batch_size": 128},
                      edge={"gpu_queue_capacity": 16, "gpu_slot_wait_s": 5}) as p:
        n = L.RING_N + 60

        replies = await asyncio.gather(*[_get_once(p.gpu.port, f"/inference?d=item+{i}", 30) for i in range(n)])
        refused = [r for r in replies if r.startswith(b"HTTP/1.1 429")]
        assert refused and p.stats["queue_full"] + p.stats["expired"] == len(refused), p.stats
        assert all(b'"code":"overloaded"' in r for r in refused)
        assert sum(r.startswith(b"HTTP/1.1 200") for r in replies) + len(refused) == n
        assert p.ring_is_clean()


async def test_a_disconnect_cancels_hot_work_and_frees_its_slot(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.4)
    async with planes(tmp_path, engine=engine, cache={"enabled": False}, batcher={"max_batch_size": 1,
                                                                               "max_wait_us": 0}) as p:
        port = p.gpu.port
        calls = len(engine.calls)
        blocker = asyncio.create_task(asyncio.to_thread(exchange, p.urls["gpu"], get("/inference?d=first")))
        await asyncio.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port)) as s:  # queued behind the blocker, then gone
            s.sendall(get("/inference?d=abandoned"))
            await asyncio.sleep(0.1)
        assert (await blocker).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.6)
        assert len(engine.calls) - calls == 1, "the abandoned request still ran"
        assert p.ring_is_clean()


async def test_a_large_body_reaches_the_pipeline(tmp_path: Path) -> None:
    # Far more than the feed buffers before the data plane asks for the body (reading pauses, then resumes).
    async with planes(tmp_path, engine=FakeEngine(), cache={"enabled": False}, auth={"enabled": False}) as p:
        inputs = ", ".join(f'"{i} ' + "word " * 1000 + '"' for i in range(40))  # 200 kB, 40 inputs
        body = b'{"input": [%s], "model": "%s"}' % (inputs.encode(), MODEL.encode())
        raw = b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        got = same(await p.both(raw))
        assert got.startswith(b"HTTP/1.1 200") and got.count(b'"object":"embedding"') == 40


async def test_stop_drains_like_the_listener(tmp_path: Path) -> None:
    engine = FakeEngine(delay_s=0.3)
    async with planes(tmp_path, engine=engine, cache={"enabled": False}, auth={"enabled": False}) as p:
        port = p.gpu.port

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port)

        idle_r, idle_w = await connect()
        idle_w.write(b"GET /healthz HTTP/1.1\r\n\r\n")  # answered, then the connection stays open, idle
        head = await asyncio.wait_for(idle_r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head
        await idle_r.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
        hot_r, hot_w = await connect()
        hot_w.write(b"GET /inference?d=hot HTTP/1.1\r\n\r\n")  # keep-alive, in service on the ring
        cpu_r, cpu_w = await connect()
        body = b'{"input": "cpu", "model": "%s"}' % MODEL.encode()
        cpu_w.write(b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await asyncio.sleep(0.1)
        await p.gpu.stop(5)
        # In service: answered, then closed (the CPU path says so); idle: closed at once. Nothing hangs.
        hot = await asyncio.wait_for(hot_r.read(), 5)
        assert hot.startswith(b"HTTP/1.1 200") and b'"input":"hot"' in hot
        cpu = await asyncio.wait_for(cpu_r.read(), 5)
        assert cpu.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in cpu
        assert await asyncio.wait_for(idle_r.read(), 5) == b""
        for w in (idle_w, hot_w, cpu_w):
            w.close()
        assert p.gpu.plane is not None and p.gpu.plane.device is None and not p.gpu.ready


@pytest.mark.parametrize("build", ["cpu", "gpu"])
async def test_hot_inputs_read_as_the_listener_reads_them(tmp_path: Path, build: str) -> None:
    # With auth off these reach the embedder: the kernel's reading of d= (or its hand-off to the CPU) must
    # give the input Python's query parsing gives, and the same keep-alive decision; whoever writes the answer.
    async with planes(tmp_path, engine=FakeEngine(), cache={"enabled": False}, auth={"enabled": False},
                      edge={"gpu_build": build}) as p:
        for raw in (get("/inference?d=a&d=b"), get("/inference?x&d=a"), get("/inference?d=a;b"),
                    get("/inference?d=a%2Bb+c"), get("/inference?d=%00"), get("/inference?d=%e2%82%ac"),
                    get("/inference?&d=a"), get("/inference?d"), get("/inference?D=a"), get("/inference/?d=a"),
                    get("/inference?d=a", "Upgrade: h2c"), get("/inference?d=a", "Content-Length: 0"),
                    get("/inference?d=" + "%41" * 2100),
                    b"GET /inference?d=a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /index. HTTP/1.0\r\n\r\n",
                    b"GET /inference?d=a HTTP/1.1\r\nConnection: close, keep-alive\r\n\r\n"):
            same(await p.both(raw))
        assert p.stats["requests"] - p.stats["cpu"] >= 5 and p.stats["cpu"] >= 3, p.stats  # both halves served
        assert (p.stats["built"] >= 5) if build == "gpu" else (p.stats["built"] == 0), p.stats
        assert p.ring_is_clean()


class _Gate:
    """A CUDA event stand-in the test opens: ``synchronize`` blocks (at most 5 s, then says it timed out)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.timed_out = False

    @property
    def done(self) -> bool:
        return self.opened.is_set()

    def synchronize(self) -> None:
        if not self.opened.wait(5):
            self.timed_out = True


class _HeldDevice(ReferenceDevice):
    """The reference kernels, but a burst with a ``d=held`` head stays "on the GPU" until the gate opens."""

    def __init__(self, capacity: int = 1024) -> None:
        super().__init__(capacity)
        self.gate = _Gate()
        self.bursts: list[int] = []

    def launch_parse_admit(self, heads: Sequence[bytes]) -> Launched[np.ndarray]:
        rows = self.parse_admit(heads)
        self.bursts.append(len(heads))
        held = any(b"d=held" in h for h in heads)
        return Launched(lambda: rows, self.gate if held else None)


async def test_the_event_loop_serves_while_a_burst_is_on_the_gpu(tmp_path: Path) -> None:
    # The loop must not wait for the GPU: a finished inference is built and written while the next burst is
    # still on the device, and heads arriving meanwhile are framed and go together into the burst after it.
    devices: list[_HeldDevice] = []

    def make(capacity: int) -> _HeldDevice:
        devices.append(_HeldDevice(capacity))
        return devices[-1]

    engine = FakeEngine(delay_s=0.3)
    async with planes(tmp_path, device=make, engine=engine, cache={"enabled": False}, auth={"enabled": False},
                      batcher={"max_batch_size": 8, "max_wait_us": 0}) as p:
        dev, plane = devices[0], p.gpu.plane
        assert plane is not None
        first = asyncio.create_task(_get_once(p.gpu.port, "/inference?d=first", 10))
        await asyncio.sleep(0.1)  # "first" is in the engine (0.3 s)
        held = asyncio.create_task(_get_once(p.gpu.port, "/inference?d=held", 10))
        for _ in range(300):
            if len(dev.bursts) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(dev.bursts) == 2, dev.bursts
        reply = await asyncio.wait_for(first, 3)
        assert reply.startswith(b"HTTP/1.1 200") and b'"input":"first"' in reply
        assert not dev.gate.done and not dev.gate.timed_out, "answered only after the held burst came back"
        later = [asyncio.create_task(_get_once(p.gpu.port, f"/inference?d=later+{i}", 10)) for i in range(5)]
        for _ in range(300):
            if len(plane._pending) == 5:
                break
            await asyncio.sleep(0.01)
        assert len(plane._pending) == 5, "heads were not framed while the burst was on the GPU"
        dev.gate.opened.set()
        assert (await asyncio.wait_for(held, 5)).startswith(b"HTTP/1.1 200")
        for i, task in enumerate(later):
            got = await asyncio.wait_for(task, 5)
            assert got.startswith(b"HTTP/1.1 200") and b'"input":"later %d"' % i in got
        assert dev.bursts == [1, 1, 5], dev.bursts
        assert plane.stats["gpu_waits_off_loop"] >= 1 and not dev.gate.timed_out, plane.stats
        assert p.ring_is_clean()
