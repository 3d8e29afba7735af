"""The CPU reference of the GPU request parser: h11's ABNF, applied strictly, same precedence.

The grammar pieces (token, request target characters, header field) are h11's own regexes
(``h11._abnf``); framing is stricter than h11 (CRLF only, no obs-fold, HTTP/1.0 and 1.1 only,
origin-form targets), which the GPU kernel mirrors. The order of checks decides the status
when several things are wrong; it is the contract with ``http_kernels.cu``:

1. no ``\\r\\n\\r\\n`` in the first 8192 bytes: 431 if that much arrived, else 400 (truncated)
2. a bare CR or LF in the head: 400
3. more than 64 header lines, or a header line over 4096 bytes: 431
4. request line malformed: 400; target over 4096 bytes: 414 (checked after method and version)
5. a header line not ``name: value``: 400
6. Transfer-Encoding, two Authorization headers, a bad or conflicting Content-Length: 400;
   Content-Length over 1 MiB: 413
7. path not /index., /contacts., /inference: 404; method not GET/HEAD: 405
8. /inference: the last ``d`` absent or empty, a bad %-escape, or not UTF-8 after decoding: 400;
   over 2048 decoded bytes: 414
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from h11 import _abnf

from . import _layout as L

__all__ = ["ParsedRequest", "decode_d", "parse_reference"]

_TOKEN = re.compile(_abnf.token.encode())
_HEADER = re.compile(_abnf.header_field.encode())
_TARGET = re.compile(_abnf.request_target.encode())
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the parser extracts. On an error status only ``status`` (and ``head_len``) is defined."""

    status: int
    route: int = 0
    method: int = 0
    path: tuple[int, int] = (0, 0)
    query: tuple[int, int] = (0, 0)
    d: bytes | None = None
    authorization: tuple[int, int] | None = None
    content_length: int = -1
    keep_alive: bool = False
    header_count: int = 0
    head_len: int = 0
    version: int = 1


def decode_d(query: bytes) -> tuple[int, bytes | None]:
    """The last ``d`` parameter of a query string, URL-decoded: (status, bytes or None if absent)."""
    value: bytes | None = None
    for part in query.split(b"&"):
        name, eq, val = part.partition(b"=")
        if name == b"d":
            value = val if eq else b""
    if value is None:
        return 200, None
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == 0x25:  # %
            if i + 2 >= len(value):
                return 400, None
            hexd = value[i + 1:i + 3]
            if not re.fullmatch(rb"[0-9A-Fa-f]{2}", hexd):
                return 400, None
            c = int(hexd, 16)
            i += 2
        elif c == 0x2B:  # +
            c = 0x20
        if len(out) >= L.D_MAX:
            return 414, None
        out.append(c)
        i += 1
    try:
        bytes(out).decode("utf-8")
    except UnicodeDecodeError:
        return 400, None
    return 200, bytes(out)


def _connection(value: bytes) -> int:
    flags = 0
    for tok in value.split(b","):
        tok = tok.strip(b" \t").lower()
        flags |= 1 if tok == b"close" else 2 if tok == b"keep-alive" else 0
    return flags


def parse_reference(raw: bytes) -> ParsedRequest:
    """Parse one request head as the GPU kernel does.

    >>> parse_reference(b"GET /inference?d=hi%21 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n").d
    b'hi!'
    """
    data = raw[:L.REQ_STRIDE]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return ParsedRequest(431 if len(data) >= L.REQ_STRIDE else 400)
    head_len = end + 4
    if _BARE.search(data, 0, end + 2):
        return ParsedRequest(400, head_len=head_len)
    lines = data[:end].split(b"\r\n")
    headers = lines[1:]
    if len(headers) > L.MAX_HEADERS or any(len(h) > L.MAX_LINE for h in headers):
        return ParsedRequest(431, head_len=head_len)
    status, line = _request_line(lines[0])
    if status != 200:
        return ParsedRequest(status, head_len=head_len)
    method, target, version = line
    fields = []
    offset = len(lines[0]) + 2
    for h in headers:
        m = _HEADER.fullmatch(h)
        if m is None:
            return ParsedRequest(400, head_len=head_len)
        fields.append((m.group("field_name").lower(), offset + m.start("field_value"), m.group("field_value")))
        offset += len(h) + 2
    clen, auth, conn = -1, None, 0
    for name, voff, value in fields:
        if name == b"transfer-encoding":
            return ParsedRequest(400, head_len=head_len)
        if name == b"authorization":
            if auth is not None:
                return ParsedRequest(400, head_len=head_len)
            auth = (voff, len(value))
        elif name == b"connection":
            conn |= _connection(value)
        elif name == b"content-length":
            if not re.fullmatch(rb"[0-9]{1,18}", value) or (clen >= 0 and int(value) != clen):
                return ParsedRequest(400, head_len=head_len)
            clen = int(value)
    if clen > L.MAX_BODY:
        return ParsedRequest(413, head_len=head_len)
    tstart = len(method) + 1
    path, _, query = target.partition(b"?")
    qoff = tstart + len(path) + 1 if b"?" in target else tstart + len(target)
    route = L.ROUTES.get(path, L.ROUTE_NOT_FOUND)
    common = {
        "route": route, "method": L.METHODS.get(method, 0), "path": (tstart, len(path)),
        "query": (qoff, len(query)), "authorization": auth, "content_length": clen,
        "keep_alive": bool(not conn & 1 and (conn & 2 or version == 1)), "header_count": len(headers),
        "head_len": head_len, "version": version,
    }
    if route == L.ROUTE_NOT_FOUND:
        return ParsedRequest(404, **common)  # type: ignore[arg-type]
    if method not in (b"GET", b"HEAD"):
        return ParsedRequest(405, **common)  # type: ignore[arg-type]
    d = None
    if route == L.ROUTE_INFERENCE:
        st, d = decode_d(query)
        if st != 200:
            return ParsedRequest(st, **common)  # type: ignore[arg-type]
        if not d:
            return ParsedRequest(400, **common)  # type: ignore[arg-type]
    return ParsedRequest(200, d=d, **common)  # type: ignore[arg-type]


def _request_line(line: bytes) -> tuple[int, tuple[bytes, bytes, int]]:
    bad = 400, (b"", b"", 0)
    method, sp, rest = line.partition(b" ")
    if not sp or not _TOKEN.fullmatch(method):
        return bad
    target, sp, version = rest.partition(b" ")
    if not sp or not target or version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return bad
    if len(target) > L.MAX_TARGET:
        return 414, (b"", b"", 0)
    if not _TARGET.fullmatch(target) or not target.startswith(b"/"):
        return bad
    return 200, (method, target, version[-1] - 0x30)
