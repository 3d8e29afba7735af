"""``/inference``'s ``d``: the pipeline's fast path for ``d=...`` alone reads it as ``parse_qsl`` would."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_node.pipeline import _query_d

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _starlette_like(query: str) -> str | None:
    text = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "d":
            text = value
    return text


# Raw query strings as clients write them, odd escapes and bytes that are not UTF-8 included.
# Backslashes and "x": the fast path decodes ``%XX`` as ``\\xXX`` escapes, so a literal one must stay literal.
_QUERY_CHARS = st.sampled_from([*"d=&+%;#?/ abcDE09x\\\n", "%2", "%zz", "%C3%A9", "%FF", "%26", "%3D", "%5C", "%5cx",
                                "\\x41", "\u00e9"])


@given(st.lists(_QUERY_CHARS, max_size=24).map("".join))
def test_the_fast_path_reads_any_query_as_parse_qsl(query: str) -> None:
    assert _query_d(query) == _starlette_like(query)
    assert _query_d("d=" + query) == _starlette_like("d=" + query)


@given(st.text(max_size=40))
def test_quoted_texts_come_back_whole(text: str) -> None:
    for quoted in (quote(text, safe=""), quote_plus(text)):
        assert _query_d("d=" + quoted) == _starlette_like("d=" + quoted) == text
