"""Random and hostile HTTP request heads for testing the GPU parser against the CPU reference.

``fuzz_requests(n, seed)`` is deterministic for a seed: valid requests to every route, then the
same mutated: truncated, oversized (target, header line, header count, whole head),
percent-encoding edge cases, CRLF injection, non-ASCII bytes and random byte flips.
"""

from __future__ import annotations

import random
from urllib.parse import quote

from edge_node.transports.gpu import _layout as L

__all__ = ["MUTATIONS", "fuzz_requests", "valid_request"]

_WORDS = ["hello", "world", "gazsi", "embedding", "naïve", "日本語", "emoji 😀", "a+b", "x&y=z", "100%"]
_PATHS = ["/inference", "/index.", "/contacts.", "/", "/inference/", "/index", "/INFERENCE", "/v1/embeddings"]
_METHODS = ["GET"] * 6 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"]
_PCT_EDGE = ["%", "%4", "%zz", "%00", "%0d%0a", "%C3%28", "%ED%A0%80", "%F4%90%80%80", "%C0%AF", "%e2%82%ac",
             "%E2%82%AC", "%2B", "+", "%25", "%7F", "%22%5C", "%F0%9F%98%80", "%ff"]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))


def valid_request(rng: random.Random) -> bytes:
    """A well-formed request head to one of the routes (or a near miss of one)."""
    method = rng.choice(_METHODS)
    path = rng.choice(_PATHS) if rng.random() < 0.3 else "/inference"
    query = ""
    if path == "/inference" or rng.random() < 0.2:
        text = _text(rng)
        enc = quote(text, safe="") if rng.random() < 0.5 else quote(text, safe=" ").replace(" ", "+")
        parts = [f"d={enc}"]
        if rng.random() < 0.3:
            parts.insert(0, f"x={rng.randint(0, 9)}")
        if rng.random() < 0.1:
            parts.append("d=" + quote(_text(rng), safe=""))  # the last d wins
        if rng.random() < 0.05:
            parts = ["d"] if rng.random() < 0.5 else ["d="]
        query = "?" + "&".join(parts)
    version = "HTTP/1.1" if rng.random() < 0.9 else "HTTP/1.0"
    headers = [("Host", "edge.local")]
    if rng.random() < 0.5:
        headers.append(("Authorization", f"Bearer gz_live_{rng.getrandbits(64):016x}"))
    if rng.random() < 0.4:
        headers.append(("Connection", rng.choice(["close", "keep-alive", "Keep-Alive, Upgrade", " close ", "upgrade"])))
    if rng.random() < 0.2:
        headers.append(("Content-Length", rng.choice(["0", "12", "1048576", "1048577", "99999999999"])))
    for i in range(rng.randint(0, 6)):
        headers.append((f"X-Test-{i}", "v" * rng.randint(0, 40)))
    if rng.random() < 0.3:
        headers.append(("User-Agent", "fuzz/1.0 (\tgazsi)"))
    rng.shuffle(headers)
    head = f"{method} {path}{query} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8")


def _truncate(rng: random.Random, req: bytes) -> bytes:
    return req[:rng.randint(0, max(0, len(req) - 1))]


def _long_target(rng: random.Random, req: bytes) -> bytes:
    n = rng.choice([L.MAX_TARGET - 40, L.MAX_TARGET + 1, L.MAX_TARGET + 200])
    return b"GET /inference?d=" + b"a" * n + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def _long_d(rng: random.Random, req: bytes) -> bytes:
    n = rng.choice([L.D_MAX, L.D_MAX + 1])
    return b"GET /inference?d=" + b"%41" * (n // 3) + b"b" * (n - n // 3) + b" HTTP/1.1\r\n\r\n"


def _long_header(rng: random.Random, req: bytes) -> bytes:
    n = rng.choice([L.MAX_LINE - 20, L.MAX_LINE + 5])
    return req.replace(b"\r\n", b"\r\nX-Big: " + b"b" * n + b"\r\n", 1)


def _many_headers(rng: random.Random, req: bytes) -> bytes:
    extra = b"".join(b"X-%d: 1\r\n" % i for i in range(rng.choice([L.MAX_HEADERS - 2, L.MAX_HEADERS + 1, 90])))
    return req.replace(b"\r\n", b"\r\n" + extra, 1)


def _huge(rng: random.Random, req: bytes) -> bytes:
    return req[:-2] + b"".join(b"X-Pad-%d: " % i + b"p" * 200 + b"\r\n" for i in range(50)) + b"\r\n"


def _pct(rng: random.Random, req: bytes) -> bytes:
    edge = rng.choice(_PCT_EDGE).encode()
    return b"GET /inference?d=ab" + edge + (b"cd" if rng.random() < 0.5 else b"") + b" HTTP/1.1\r\nHost: h\r\n\r\n"


def _crlf(rng: random.Random, req: bytes) -> bytes:
    inj = rng.choice([b"\n", b"\r", b"\r\nX-Injected: 1", b"\n\n", b"\r\r\n", b" \r\n folded"])
    pos = rng.randint(0, max(0, req.find(b"\r\n\r\n")))
    return req[:pos] + inj + req[pos:]


def _non_ascii(rng: random.Random, req: bytes) -> bytes:
    raw = "é日😀".encode()[: rng.randint(1, 9)]
    where = rng.choice(["target", "header", "method"])
    if where == "target":
        return b"GET /inference?d=" + raw + b" HTTP/1.1\r\n\r\n"
    if where == "header":
        return b"GET /inference?d=x HTTP/1.1\r\nX-Name: " + raw + b"\r\n\r\n"
    return raw + b" /index. HTTP/1.1\r\n\r\n"


def _flip(rng: random.Random, req: bytes) -> bytes:
    b = bytearray(req)
    for _ in range(rng.randint(1, 3)):
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def _misc(rng: random.Random, req: bytes) -> bytes:
    return rng.choice([
        b"GET /index. HTTP/2.0\r\n\r\n", b"GET  /index. HTTP/1.1\r\n\r\n", b"GET /index.  HTTP/1.1\r\n\r\n",
        b"GET http://x/index. HTTP/1.1\r\n\r\n", b"GET /index. HTTP/1.1\r\n: empty\r\n\r\n",
        b"GET /index. HTTP/1.1\r\nBad Name: x\r\n\r\n", b"GET /index. HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /index. HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET /index. HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"GET /index. HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"GET /index. HTTP/1.1\r\nAuthorization: a\r\nauthorization: b\r\n\r\n",
        b"\r\n\r\n", b"GET /index. HTTP/1.1\r\nX: a\x00b\r\n\r\n", b"GET /index. HTTP/1.1\r\nX:\r\n\r\n",
        b"GET /index.?d=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"GET /inference?d=%20 HTTP/1.1\r\n\r\n",
    ])


MUTATIONS = {
    "truncate": _truncate, "long_target": _long_target, "long_d": _long_d, "long_header": _long_header,
    "many_headers": _many_headers, "huge": _huge, "percent": _pct, "crlf": _crlf, "non_ascii": _non_ascii,
    "flip": _flip, "misc": _misc,
}


def fuzz_requests(n: int, seed: int = 0) -> list[bytes]:
    """``n`` request heads: about 40% valid, the rest mutated by each of :data:`MUTATIONS` in turn."""
    rng = random.Random(seed)
    names = list(MUTATIONS)
    out = []
    for i in range(n):
        req = valid_request(rng)
        if rng.random() >= 0.4:
            req = MUTATIONS[names[i % len(names)]](rng, req)
        out.append(req)
    return out
