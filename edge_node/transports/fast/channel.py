"""The node -> worker control channel: length-prefixed JSON messages over a pipe.

The node process tells its workers what changes at run time: new limits (Serve ``reconfigure``), the
routing table (peer forwarding), drain. A message is one ``os.write`` of a 4-byte length and the JSON;
the reader reassembles across reads, so messages larger than a pipe buffer still arrive whole.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import orjson

__all__ = ["MessageReader", "send_message"]

_LEN = struct.Struct("<I")


def send_message(fd: int, message: dict[str, Any]) -> None:
    """Write one message (blocking; the worker reads its channel on every loop turn)."""
    data = orjson.dumps(message)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class MessageReader:
    """Feed it what ``os.read`` returned; it yields whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if len(self._buf) < 4 + n:
                break
            out.append(orjson.loads(bytes(self._buf[4:4 + n])))
            del self._buf[:4 + n]
        return out
