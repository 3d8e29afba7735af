"""The CPU's share of parsing on the GPU data plane.

:func:`parse_head` reads a whole request head for the requests the kernels do not answer (every route
but the hot ``/inference`` and the two static pages, every error, every head too large for the kernel):
httptools, with the header limits counted as :class:`gazsi_cluster.http.listener.HttpListener` counts
them, so the same head gets the same request, or the same refusal, as on the other transports.

:func:`hot_headers` picks, for a hot ``/inference`` head the kernel already validated, the few headers
the pipeline reads besides ``Authorization`` (whose place the kernel reports): ``Cache-Control``,
``X-Gazsi-Timing`` and ``X-Gazsi-Forwarded``, and ``Upgrade`` (which the kernel ignores and the CPU
listeners refuse: such a head goes to the CPU). One regex scan, no full parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import httptools

from gazsi_cluster.errors import GazsiError, HeadersTooLarge, InvalidRequest

__all__ = ["ParsedHead", "hot_headers", "needs_cpu_query", "parse_head"]

_HOT = re.compile(rb"\r\n(cache-control|x-gazsi-timing|x-gazsi-forwarded|upgrade):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)",
                  re.IGNORECASE)
# Queries the kernel's d= decoding would read differently from Python's parse_qsl (which the pipeline
# uses): a fragment (the CPU listeners drop it) or a %-escape inside a parameter name ("%64=x" is d).
_CPU_QUERY = re.compile(rb"#|(?:^|&)[^=&]*%")


@dataclass(slots=True)
class ParsedHead:
    method: str
    path: str
    query: str
    headers: dict[str, str] = field(default_factory=dict)
    keep_alive: bool = True
    content_length: int = 0
    chunked: bool = False
    expect_continue: bool = False


class _Reject(Exception):
    def __init__(self, error: GazsiError) -> None:
        super().__init__(error.message)
        self.error = error


class _Collector:
    def __init__(self, max_headers: int, max_header_bytes: int) -> None:
        self.max_headers, self.max_header_bytes = max_headers, max_header_bytes
        self.parser: httptools.HttpRequestParser | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.count = 0
        self.size = 0
        self.complete = False
        self.keep_alive = True

    def _too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(f"request headers exceed the limit ({self.max_headers} fields, "
                               f"{self.max_header_bytes} bytes)")

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.size += len(url)
        if self.size > self.max_header_bytes:
            raise _Reject(self._too_large())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        self.size += len(name) + len(value) + 4
        if self.count > self.max_headers or self.size > self.max_header_bytes:
            raise _Reject(self._too_large())
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()


def parse_head(head: bytes, *, max_headers: int, max_header_bytes: int) -> ParsedHead:
    """The request a complete head (through its blank line) describes; raises the listener's refusal.

    >>> parse_head(b"GET /v1/models?x=1 HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n", max_headers=100, max_header_bytes=16384).path
    '/v1/models'
    """
    sink = _Collector(max_headers, max_header_bytes)
    parser = httptools.HttpRequestParser(sink)
    sink.parser = parser
    try:
        parser.feed_data(head)
    except _Reject as rej:
        raise rej.error from None
    except httptools.HttpParserUpgrade:
        raise InvalidRequest("protocol upgrades are not supported") from None
    except httptools.HttpParserError as exc:
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, _Reject):
            raise cause.error from None
        raise InvalidRequest("Invalid HTTP request") from None
    if not sink.complete:
        raise InvalidRequest("Invalid HTTP request")
    url = httptools.parse_url(sink.url)
    headers = sink.headers
    declared = headers.get("content-length", "")
    return ParsedHead(
        parser.get_method().decode("latin-1"), url.path.decode("latin-1"),
        url.query.decode("latin-1") if url.query else "", headers, sink.keep_alive,
        int(declared) if declared.isdigit() else 0, "transfer-encoding" in headers,
        headers.get("expect", "").lower() == "100-continue",
    )


def hot_headers(head: bytes, authorization: str | None) -> dict[str, str]:
    """The headers the pipeline reads, from a head the kernel parsed (the last of a repeated one wins).

    >>> hot_headers(b"GET /inference?d=x HTTP/1.1\\r\\nX-Gazsi-Timing: 1\\r\\n\\r\\n", None)
    {'x-gazsi-timing': '1'}
    """
    headers = {} if authorization is None else {"authorization": authorization}
    for m in _HOT.finditer(head):
        headers[m[1].decode("latin-1").lower()] = m[2].decode("latin-1")
    return headers


def needs_cpu_query(query: bytes) -> bool:
    """Whether Python's query parsing could read ``d`` differently from the kernel (then the CPU answers).

    >>> needs_cpu_query(b"d=plain+text"), needs_cpu_query(b"%64=x"), needs_cpu_query(b"d=a#b")
    (False, True, True)
    """
    if query.startswith(b"d=") and b"&" not in query:  # GAZSI's clients: one parameter, named d
        return b"#" in query
    return _CPU_QUERY.search(query) is not None
