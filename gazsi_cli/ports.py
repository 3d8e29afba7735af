"""Pick a free TCP port that nothing else on the machine is about to take.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, the same range
every outgoing connection and every other ``bind(0)`` draws from. Between choosing it and handing
it to its real owner (``ray start --port``, Serve's proxy, a Redis) any of Ray's own processes
may bind it first: Ray's agents and gRPC servers take ephemeral ports while they start, and a
Serve proxy then fails with "Failed to bind to address" (seen in CI). So the port is drawn at
random from below the ephemeral range and above Ray's worker ports, where nothing binds unless
asked to, and checked by binding it on every address.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

# Ray's default --min-worker-port/--max-worker-port: its workers bind ports in this range.
_RAY_WORKER_PORTS_END = 19_999
_FIRST = 20_000
# Linux's default ephemeral range starts at 32768; BSD and macOS use 49152.
_DEFAULT_EPHEMERAL_START = 32_768
_TRIES = 200
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ports this process has handed out and whose owner may not have bound them yet: two calls in a
# row (`ray start --port=A --dashboard-port=B`) must not return the same one.
_handed: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_START


def _bindable(port: int) -> bool:
    # The wildcard address: a listener on any one address of this host makes it fail, as it
    # would for Ray, which binds its node address.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on every address, outside the ephemeral range when the machine leaves room."""
    last = _ephemeral_start() - 1
    if last - _FIRST >= _TRIES:
        for port in random.sample(range(_FIRST, last + 1), _TRIES):
            if port not in _handed and _bindable(port):
                _handed.add(port)
                return port
    # A machine whose ephemeral range covers everything: the kernel's choice is all there is.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
