"""The fast front's shared-memory ring and the worker's request logic, without sockets or processes."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator

import numpy as np
import orjson
import pytest

from edge_node.dataplane.fast.ring import (
    DOWN_MARKER,
    ENGINE_LOADING,
    ENGINE_UP,
    RingLayout,
    SlotRing,
    pack_indices,
    unpack_indices,
)
from edge_node.dataplane.fast.worker import FrontApp
from edge_node.tokenization import TextTokenizer
from gazsi_cluster.auth import AllowAll, Principal
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import AuthenticationError, RateLimited
from gazsi_cluster.http.asgi import to_response
from gazsi_cluster.model import load_model_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

LAYOUT = RingLayout(workers=2, slots_per_worker=2, slot_inputs=4, slot_tokens=64, dimensions=8)


@pytest.fixture
def ring() -> Iterator[SlotRing]:
    r = SlotRing.create(LAYOUT)
    yield r
    r.close()


def test_indices_round_trip() -> None:
    idx = [0, 3, 7, DOWN_MARKER]
    assert unpack_indices(pack_indices(idx)) == idx
    assert unpack_indices(pack_indices(idx) + b"\x01") == idx  # a stray partial word is ignored


def test_layout_arrays_do_not_overlap() -> None:
    spans = sorted(LAYOUT.offsets().values())
    for (a, size), (b, _) in itertools.pairwise(spans):
        assert a + size <= b and b % 64 == 0
    assert LAYOUT.worker_of(0) == 0 and LAYOUT.worker_of(3) == 1


def test_request_and_result_round_trip_through_an_attached_view(ring: SlotRing) -> None:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 30000, size=n).astype(np.int64) for n in (3, 1, 9)]
    ring.set_state(ENGINE_UP, generation=4)
    ring.write_request(2, seqs, deadline=123.5)
    other = SlotRing.attach(LAYOUT, ring.name)
    try:
        got = other.read_request(2)
        assert [g.tolist() for g in got] == [s.tolist() for s in seqs]
        assert int(other.meta[2, 0]) == 4 and other.deadline[2] == 123.5
        vecs = rng.standard_normal((3, 8)).astype(np.float32)
        other.write_result(2, vecs, batch_size=5, inference_us=77, cache="miss")
        assert np.array_equal(ring.vectors[2, :3], vecs)
        other.write_error(1, "Overloaded", "full ü", "input", 1.5)
        assert ring.read_error(1) == ("Overloaded", "input", "full ü", 1.5)
    finally:
        other.close()


class _Denied:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def authorize(self, authorization: str | None, *, model: str | None = None, admin: bool = False) -> Principal:
        raise self.exc

    async def record_usage(self, principal: Principal, *, model: str, tokens: int) -> None:
        return None


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    spec = load_model_spec("all-MiniLM-L6-v2")
    return TextTokenizer(spec.path, 256)


def _front(ring: SlotRing, tokenizer: TextTokenizer, authorizer: object = None) -> tuple[FrontApp, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    settings = load_settings(None, auth={"enabled": False}, batcher={"request_timeout_s": 2.0})
    app = FrontApp(settings, ring, 0, w, tokenizer, authorizer or AllowAll())  # type: ignore[arg-type]
    return app, r


async def _engine_once(app: FrontApp, ring: SlotRing, req_fd: int) -> None:
    """A stand-in engine: answer every queued slot with a constant vector."""
    for _ in range(200):
        try:
            data = os.read(req_fd, 4096)
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        for slot in unpack_indices(data):
            n = int(ring.meta[slot, 1])
            ring.write_result(slot, np.ones((n, 8), np.float32) / np.sqrt(8), 1, 10, None)
        app.on_responses(data)
        return


async def test_inference_goes_through_the_ring(ring: SlotRing, tokenizer: TextTokenizer) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    app, req_fd = _front(ring, tokenizer)
    task = asyncio.create_task(app.handle("GET", b"/inference?d=hello%20there", {}, b""))
    await _engine_once(app, ring, req_fd)
    status, body, _ = await task
    assert status == 200
    assert orjson.loads(body)["tokens"] == 4
    assert len(app._free) == LAYOUT.slots_per_worker  # the slot came back


async def test_no_free_slot_is_429_at_once(ring: SlotRing, tokenizer: TextTokenizer) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    app, _ = _front(ring, tokenizer)
    app._free.clear()
    status, body, headers = await app.handle("GET", b"/inference?d=x", {}, b"")
    assert status == 429 and ("retry-after", "1") in headers
    assert orjson.loads(body)["error"]["code"] == "overloaded"


async def test_engine_down_marker_fails_in_flight_with_503(ring: SlotRing, tokenizer: TextTokenizer) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    app, _ = _front(ring, tokenizer)
    task = asyncio.create_task(app.handle("GET", b"/inference?d=x", {}, b""))
    await asyncio.sleep(0.05)
    app.on_responses(pack_indices([DOWN_MARKER]))
    status, body, _ = await task
    assert status == 503 and orjson.loads(body)["error"]["type"] == "service_unavailable"
    assert len(app._free) == LAYOUT.slots_per_worker


async def test_loading_engine_is_503(ring: SlotRing, tokenizer: TextTokenizer) -> None:
    ring.set_state(ENGINE_LOADING)
    app, _ = _front(ring, tokenizer)
    status, body, _ = await app.handle("GET", b"/inference?d=x", {}, b"")
    assert status == 503 and "loading" in orjson.loads(body)["error"]["message"]


@pytest.mark.parametrize("exc", [
    AuthenticationError("Invalid API key"),
    RateLimited("slow down", retry_after=3, headers={"X-RateLimit-Remaining-Requests": "0"}),
])
async def test_auth_errors_have_the_fastapi_shape(ring: SlotRing, tokenizer: TextTokenizer, exc: Exception) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    app, _ = _front(ring, tokenizer, _Denied(exc))
    body = orjson.dumps({"input": "x", "model": "all-MiniLM-L6-v2"})
    status, out, headers = await app.handle("POST", b"/v1/embeddings", {"authorization": "Bearer k"}, body)
    want = to_response(exc)
    assert (status, out) == (want.status_code, bytes(want.body))
    assert {k.lower() for k, _ in headers} == {k for k in want.headers if k not in ("content-length", "content-type")}


async def test_deadline_gives_504_and_slot_is_reclaimed_when_answered(ring: SlotRing, tokenizer: TextTokenizer) -> None:
    ring.set_state(ENGINE_UP, generation=1)
    app, req_fd = _front(ring, tokenizer)
    app.timeout_s = 0.05
    status, _body, _ = await app.handle("GET", b"/inference?d=x", {}, b"")
    assert status == 504
    assert len(app._free) == LAYOUT.slots_per_worker - 1  # the engine still owns it
    await _engine_once(app, ring, req_fd)
    assert len(app._free) == LAYOUT.slots_per_worker


def test_package_surface_is_pinned() -> None:
    import edge_node.dataplane.fast as fast

    assert fast.__all__ == ["FastFront", "RingLayout", "SlotRing", "serve_fast"]
