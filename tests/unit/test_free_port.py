"""gazsi_cli.ports.free_port: ports outside the kernel's ephemeral range, never one in use, never twice.

CI once failed because a port taken with ``bind(0)`` for Serve's proxy was bound by one of Ray's
own processes (which draw from the ephemeral range) before the proxy started.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from gazsi_cli import ports


def _range_file(tmp_path: Path, start: int) -> Path:
    path = tmp_path / "ip_local_port_range"
    path.write_text(f"{start}\t60999\n")
    return path


def test_ports_are_below_the_ephemeral_range_and_distinct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_RANGE_FILE", _range_file(tmp_path, 32768))
    monkeypatch.setattr(ports, "_handed", set())
    got = [ports.free_port() for _ in range(100)]
    assert all(20_000 <= p < 32_768 for p in got)
    assert len(set(got)) == len(got)


def test_a_port_someone_listens_on_is_never_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 candidates, 250 of them held by listeners on one loopback address: the wildcard check
    # must see them taken.
    monkeypatch.setattr(ports, "_RANGE_FILE", _range_file(tmp_path, 20_300))
    monkeypatch.setattr(ports, "_handed", set())
    held: set[int] = set()
    with contextlib.ExitStack() as stack:
        for port in range(20_000, 20_250):
            sock = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port))
                sock.listen()
                held.add(port)
        assert len(held) > 200
        got = [ports.free_port() for _ in range(20)]
    assert not held & set(got)
    assert all(20_000 <= p < 20_300 for p in got)


def test_no_room_below_the_ephemeral_range_falls_back_to_the_kernel(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_RANGE_FILE", _range_file(tmp_path, 20_050))
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("", port))  # free as promised
