"""The one HTTP/1.1 renderer: its short path for plain JSON replies writes what the general form writes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gazsi_cluster.http.wire import _REASONS, HttpReply, render, render_head

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _general(reply: HttpReply, keep_alive: bool) -> bytes:
    """The head as render_head's docstring defines it, written out line by line."""
    lines = [b"HTTP/1.1 %d %s" % (reply.status, _REASONS.get(reply.status, b"Unknown")),
             b"content-type: " + reply.content_type.encode("latin-1")]
    lines.append(b"content-length: %d" % len(reply.body) if reply.stream is None else b"transfer-encoding: chunked")
    lines += [f"{k.lower()}: {v}".encode("latin-1") for k, v in reply.headers]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


_HEADER = st.tuples(st.sampled_from(["X-Gazsi-Cache", "Retry-After", "Server-Timing"]), st.text("ab1;=", max_size=8))


@given(st.sampled_from([200, 400, 404, 429, 499, 503, 599, 799]), st.binary(max_size=64),
       st.lists(_HEADER, max_size=2), st.sampled_from(["application/json", "text/html; charset=utf-8"]),
       st.booleans())
def test_every_head_is_the_general_form(status: int, body: bytes, headers: list[tuple[str, str]], content_type: str,
                                        keep_alive: bool) -> None:
    reply = HttpReply(status, body, headers, content_type)
    assert render_head(reply, keep_alive=keep_alive) == _general(reply, keep_alive)
    assert render(reply, keep_alive=keep_alive) == _general(reply, keep_alive) + body
