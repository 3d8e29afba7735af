"""The CPU reference parser, the fuzz generator, and the kernel's shared C helpers built for the host."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import h11
import numpy as np
import pytest

from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu._reference import decode_d, parse_reference
from tests.support.gpu_compare import normalise, row_to_parsed
from tests.support.http_fuzz import MUTATIONS, fuzz_requests
from tests.support.required import unavailable

pytestmark = pytest.mark.unit


def test_valid_inference_request_fields() -> None:
    raw = b"GET /inference?x=1&d=caf%C3%A9+au+lait HTTP/1.1\r\nHost: h\r\nAuthorization:  Bearer k \r\n\r\n"
    p = parse_reference(raw)
    assert p.status == 200
    assert p.route == L.ROUTE_INFERENCE
    assert p.d == "café au lait".encode()
    assert p.authorization is not None
    off, n = p.authorization
    assert raw[off:off + n] == b"Bearer k"
    assert raw[p.path[0]:p.path[0] + p.path[1]] == b"/inference"
    assert raw[p.query[0]:p.query[0] + p.query[1]] == b"x=1&d=caf%C3%A9+au+lait"
    assert p.keep_alive is True
    assert p.header_count == 2
    assert p.head_len == len(raw)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /inference?d=hi HTTP/1.1\r\nHost: h\r\n", 400),  # truncated
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"POST /index. HTTP/1.1\r\n\r\n", 405),
        (b"POST /nope HTTP/1.1\r\n\r\n", 404),
        (b"GET /index. HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /index. HTTP/1.1\r\nX: " + b"a" * 5000 + b"\r\n\r\n", 431),
        (b"GET /index. HTTP/1.1\r\n" + b"X: 1\r\n" * 65 + b"\r\n", 431),
        (b"GET /index. HTTP/1.1\r\n" + (b"X: " + b"a" * 3000 + b"\r\n") * 3 + b"\r\n", 431),  # head > 8 KiB
        (b"GET /index. HTTP/1.1\nX: 1\r\n\r\n", 400),  # bare LF
        (b"GET /index. HTTP/1.1\r\n folded\r\n\r\n", 400),  # obs-fold
        (b"GET /inference?d=%ZZ HTTP/1.1\r\n\r\n", 400),
        (b"GET /inference?d=%C3%28 HTTP/1.1\r\n\r\n", 400),
        (b"GET /inference?d= HTTP/1.1\r\n\r\n", 400),
        (b"GET /inference HTTP/1.1\r\n\r\n", 400),
        (b"GET /index. HTTP/2.0\r\n\r\n", 400),
    ],
)
def test_statuses(raw: bytes, status: int) -> None:
    assert parse_reference(raw).status == status


def test_decode_d_rules() -> None:
    assert decode_d(b"d=a%2Bb+c&d=last") == (200, b"last")
    assert decode_d(b"x=1") == (200, None)
    assert decode_d(b"d") == (200, b"")
    assert decode_d(b"d=%0d%0a") == (200, b"\r\n")
    assert decode_d(b"d=%4") == (400, None)
    assert decode_d(b"d=%ED%A0%80") == (400, None)  # a surrogate is not UTF-8
    assert decode_d(b"d=" + b"a" * (L.D_MAX + 1))[0] == 414


def test_fuzz_is_deterministic_and_covers_every_status() -> None:
    a, b = fuzz_requests(3000, seed=7), fuzz_requests(3000, seed=7)
    assert a == b
    assert fuzz_requests(50, seed=8) != a[:50]
    statuses = Counter(parse_reference(r).status for r in a)
    assert set(statuses) == {200, 400, 404, 405, 413, 414, 431}
    assert len(MUTATIONS) >= 10


def test_accepted_requests_agree_with_h11() -> None:
    # Where the strict reference accepts a head, h11 (the standard parser) must read the same
    # method, target, version and headers out of it.
    checked = 0
    for raw in fuzz_requests(2000, seed=3):
        p = parse_reference(raw)
        if p.status not in (200, 404, 405) or b"\r\nHost:" not in raw[:p.head_len]:
            continue
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(raw[:p.head_len])
        event = conn.next_event()
        assert isinstance(event, h11.Request), raw
        assert event.target == raw[p.path[0]:p.query[0] + p.query[1]] or event.target == raw[p.path[0]:p.path[0] + p.path[1]]
        assert event.http_version == b"1.%d" % p.version
        assert len(event.headers) == p.header_count
        if p.authorization is not None:
            auth = dict(event.headers)[b"authorization"]
            assert auth == raw[p.authorization[0]:p.authorization[0] + p.authorization[1]]
        checked += 1
    assert checked > 300


@pytest.fixture(scope="module")
def host_parser(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        unavailable("no C compiler (gcc/cc) to build the GPU kernels' parsing helpers for the host")
    src = Path(__file__).with_name("gz_host_harness.c")
    lib = tmp_path_factory.mktemp("gz") / "gzhost.so"
    subprocess.run([cc, "-x", "c", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(lib), str(src)],
                   check=True, timeout=60)
    dll = ctypes.CDLL(str(lib))
    dll.gz_host_parse.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    dll.gz_host_parse.restype = ctypes.c_int
    return dll


def test_host_build_of_kernel_helpers_matches_reference(host_parser: ctypes.CDLL) -> None:
    out = np.zeros(L.NFIELDS, dtype=np.int32)
    dout = np.zeros(L.D_MAX, dtype=np.uint8)
    mismatches = []
    reqs = fuzz_requests(4000, seed=11)
    for raw in reqs:
        buf = np.frombuffer(raw[:L.REQ_STRIDE].ljust(L.REQ_STRIDE, b"\0"), dtype=np.uint8)
        host_parser.gz_host_parse(buf.ctypes.data, len(raw), out.ctypes.data, dout.ctypes.data)
        got = row_to_parsed(out, dout.tobytes())
        want = normalise(parse_reference(raw))
        if got != want:
            mismatches.append((raw[:120], got, want))
    assert not mismatches, mismatches[:3]
