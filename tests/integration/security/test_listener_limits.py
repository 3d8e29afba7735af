"""Request limits enforced by the listener before any app work, each probed with raw loopback sockets, on every
transport."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.support.edge import TRANSPORTS

from .conftest import inputs_embedded, read_all, running_edge

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60), pytest.mark.parametrize("dataplane", TRANSPORTS)]

BODY = json.dumps({"input": "hello", "model": "all-MiniLM-L6-v2"}).encode()


def _request(extra_headers: str = "", body: bytes = BODY, path: str = "/v1/embeddings") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}\r\n").encode() + body


def _status_and_error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body).get("error", {}) if body.startswith(b"{") else {}


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return read_all(s)


async def test_valid_request_passes_the_limits(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        raw = await asyncio.to_thread(_exchange, server.port, _request("Connection: close\r\n"))
        status, _ = _status_and_error(raw)
        assert status == 200 and b'"embedding"' in raw


async def test_too_many_header_fields_is_431(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        many = "".join(f"X-H{i}: v\r\n" for i in range(30))  # limit is 20
        raw = await asyncio.to_thread(_exchange, server.port, _request(many))
        status, err = _status_and_error(raw)
        assert status == 431 and err["code"] == "request_header_fields_too_large"
        assert b"connection: close" in raw.lower()
        assert inputs_embedded(server) == 0  # nothing reached the model


async def test_oversized_header_section_is_431(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        raw = await asyncio.to_thread(_exchange, server.port, _request(f"X-Big: {'a' * 3000}\r\n"))
        assert _status_and_error(raw)[0] == 431


async def test_unterminated_giant_header_is_431_not_buffered(tmp_path: Path, dataplane: str) -> None:
    # One header line that never ends: httptools would buffer it; the raw byte guard stops it.
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        payload = b"GET /healthz HTTP/1.1\r\nHost: e\r\nX-Endless: " + b"a" * 20_000
        raw = await asyncio.to_thread(_exchange, server.port, payload)
        assert _status_and_error(raw)[0] == 431


async def test_body_over_limit_is_413_openai_shaped(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        body = json.dumps({"input": "x" * 5000, "model": "all-MiniLM-L6-v2"}).encode()
        raw = await asyncio.to_thread(_exchange, server.port, _request("Connection: close\r\n", body))
        status, err = _status_and_error(raw)
        assert status == 413 and err["type"] == "invalid_request_error"


async def test_inputs_per_request_and_chars_per_input_are_400(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as c:
            r = await c.post("/v1/embeddings", json={"input": ["a"] * 9, "model": "all-MiniLM-L6-v2"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs"
            r = await c.post("/v1/embeddings", json={"input": "é" * 1001, "model": "all-MiniLM-L6-v2"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def _slowloris(port: int) -> tuple[bytes, int]:
    """Send the request line then one header byte every 0.2 s; returns (answer, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: e\r\n")
        try:
            for _ in range(50):  # 10 s of trickling, far past the 0.5 s header timeout
                s.sendall(b"X")
                sent += 1
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_all(s), sent


async def test_slowloris_gets_408_and_is_closed(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        raw, sent = await asyncio.to_thread(_slowloris, server.port)
        status, err = _status_and_error(raw)
        assert status == 408 and err["code"] == "request_timeout"
        assert sent < 50  # the server cut the trickle off instead of waiting for it


async def test_silent_connection_gets_408(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                return read_all(s)
        assert _status_and_error(await asyncio.to_thread(silent))[0] == 408


async def test_stalled_body_closes_the_connection(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        def stall() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(_request(body=b"")[:-4] .replace(b"Content-Length: 0", b"Content-Length: 500")
                          + b"\r\n\r\n{\"input\":")
                return read_all(s)
        raw = await asyncio.to_thread(stall)
        # Closed without an answer the client could mistake for success, and no inference ran.
        assert b"200 OK" not in raw
        assert inputs_embedded(server) == 0


async def test_a_pipelined_request_whose_headers_never_end_gets_408(tmp_path: Path, dataplane: str) -> None:
    """The answer to the first request must not turn the second's header deadline into an idle one."""
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        def pipelined() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                t0 = time.monotonic()
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\nGET /healthz HTTP/1.1\r\nHost: e\r\nX-Slow: 1\r\n")
                return read_all(s), time.monotonic() - t0
        raw, took = await asyncio.to_thread(pipelined)
        first, _, rest = raw.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        assert b"HTTP/1.1 408" in rest, raw[-300:]
        assert took < 4.0  # header_timeout_s is 0.5 here: cut off, not left until the client gave up


async def test_idle_keep_alive_close_is_eof_not_timeout(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        def idle() -> str:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n")
                first = b""
                while b'"ok"}' not in first:  # the whole response, however it was split
                    first += s.recv(65536)
                assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
                s.settimeout(5)
                try:
                    return "eof" if s.recv(1) == b"" else "data"
                except TimeoutError:
                    return "still open"
        assert await asyncio.to_thread(idle) == "eof"


async def test_connections_per_client_address_are_capped(tmp_path: Path, dataplane: str) -> None:
    async with running_edge(tmp_path, dataplane=dataplane) as (server, _):
        def crowd() -> tuple[list[bytes], bytes, bytes]:
            held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
            try:
                for s in held:  # each of the 4 allowed connections works
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n")
                answers = [s.recv(65536) for s in held]
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as fifth:
                    refused = read_all(fifth)
            finally:
                held[0].close()
            time.sleep(0.2)  # let the server see the close
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as again:
                again.sendall(b"GET /healthz HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n")
                after = read_all(again)
            for s in held[1:]:
                s.close()
            return answers, refused, after
        answers, refused, after = await asyncio.to_thread(crowd)
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        status, err = _status_and_error(refused)
        assert status == 429 and err["code"] == "too_many_connections" and b"retry-after" in refused.lower()
        assert after.startswith(b"HTTP/1.1 200")
