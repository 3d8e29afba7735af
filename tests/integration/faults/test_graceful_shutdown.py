"""SIGTERM to `gazsi edge serve` under load: in-flight requests finish, new ones are refused, nothing is cut."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.edge import TRANSPORTS
from tests.support.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]
BODY = json.dumps({"input": ["graceful", "shutdown"], "model": "all-MiniLM-L6-v2"}).encode()


def _start(tmp_path: Path, dataplane: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve", "--port",
         str(port), "--admin-port", "0", "--dataplane", dataplane, "--workers", "2", "--backend", "fake", "--no-auth",
         "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, GAZSI_LIMITS__BODY_TIMEOUT_S="60"),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"edge did not start: {proc.stdout.read() if proc.stdout else b''!r}")
        time.sleep(0.1)


@pytest.mark.parametrize("dataplane", TRANSPORTS)
def test_sigterm_finishes_in_flight_refuses_new_and_cuts_nothing(tmp_path: Path, dataplane: str) -> None:
    proc, port = _start(tmp_path, dataplane)
    outcomes: list[str] = []
    stop = threading.Event()

    request = (f"POST /v1/embeddings HTTP/1.1\r\nHost: e\r\nContent-Type: application/json\r\n"
               f"Connection: close\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY

    def load() -> None:
        # Raw sockets, one connection per request, so every outcome is told apart exactly.
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
            except ConnectionRefusedError:
                outcomes.append("refused")
                continue
            answer = b""
            try:
                s.sendall(request)
                while chunk := s.recv(65536):
                    answer += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
            finally:
                s.close()
            if not answer:
                # Reset with not one byte back: the kernel had queued the connection but the
                # server closed its listener before accepting it, so the request was never read.
                outcomes.append("unaccepted")
                continue
            head, _, body = answer.partition(b"\r\n\r\n")
            try:
                ok = head.startswith(b"HTTP/1.1 200") and len(json.loads(body)["data"]) == 2
            except ValueError:
                ok = False
            outcomes.append("ok" if ok else f"broken {answer[:80]!r}")

    try:
        # An in-flight request: headers and half the body are in when SIGTERM arrives.
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: e\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(BODY)}\r\n\r\n").encode()
        held.sendall(head + BODY[:10])
        time.sleep(0.3)
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # shutdown has begun: the listener is closed, the held request still open
        new_conn_refused = False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            new_conn_refused = True
        assert proc.poll() is None, "the server exited with a request still in flight"
        held.sendall(BODY[10:])
        answer = b""
        while True:
            chunk = held.recv(65536)
            if not chunk:
                break
            answer += chunk
        held.close()
        stop.set()
        for t in threads:
            t.join(15)
        rc = proc.wait(30)
        log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    head_part, _, body_part = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"connection: close" in head_part.lower()  # served, then closed: no keep-alive past shutdown
    assert len(json.loads(body_part)["data"]) == 2  # complete, parseable body
    assert new_conn_refused
    assert rc == 0  # a clean exit after the drain
    assert "Traceback" not in log and "ERROR" not in log, log[-2000:]
    assert outcomes.count("ok") > 0 and "refused" in outcomes
    assert [o for o in outcomes if o not in ("ok", "refused", "unaccepted")] == []
