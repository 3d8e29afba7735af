"""Server-sent events as the relay sees them: whole events out of arbitrary byte chunks, usage read on the way.

The relay forwards whole events (never half of one), so it can drop the usage-only chunk it asked for
on the client's behalf and end a broken stream with one well-formed error event.

>>> s = SseSplitter(); s.feed(b'data: {"a":1}\\n\\nda'), s.feed(b'ta: [DONE]\\n\\n')
([b'data: {"a":1}\\n\\n'], [b'data: [DONE]\\n\\n'])
"""

from __future__ import annotations

from typing import Any

import orjson

from gazsi_cluster.errors import UpstreamError
from gazsi_cluster.http.errors import error_reply

__all__ = ["SseSplitter", "UsageTap", "error_event"]

_DONE = b"[DONE]"


def error_event(exc: BaseException) -> bytes:
    """The final event of a stream that broke: the same OpenAI error body a reply would carry."""
    return b"data: " + error_reply(exc).body + b"\n\n"


class SseSplitter:
    """Bytes in, complete events out (an event ends at a blank line, ``\\n\\n`` or ``\\r\\n\\r\\n``).

    ``max_event_bytes`` bounds what one event may hold while it is incomplete: an upstream that never
    ends an event cannot make the relay buffer without bound.
    """

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buf = b""
        self.max_event_bytes = max_event_bytes

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            events.append(buf[start:end + 2])
            start = end + 2
        self._buf = buf[start:]
        if len(self._buf) > self.max_event_bytes:
            raise UpstreamError(f"an upstream event exceeded {self.max_event_bytes} bytes")
        return events

    def rest(self) -> bytes:
        """What came after the last complete event (a stream that ended mid-event)."""
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one event (lines joined), None for comments and other fields."""
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


class UsageTap:
    """Reads prompt/completion tokens and content chunks from what passes; decides what the client sees.

    ``drop_usage_chunk``: the relay asked for ``stream_options.include_usage`` and the client did not,
    so the usage-only chunk (``choices: []``) is read, then withheld.
    """

    def __init__(self, *, drop_usage_chunk: bool = False) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.content_chunks = 0  # events that carried generated text: the count where usage is absent
        self.done = False
        self.error: dict[str, Any] | None = None

    @property
    def from_upstream(self) -> bool:
        return self.completion_tokens is not None

    def _usage(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(p, int):
                self.prompt_tokens = p
            if isinstance(c, int):
                self.completion_tokens = c

    def body(self, raw: bytes) -> None:
        """A whole (non-streamed) answer."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict):
            self._usage(obj)

    def event(self, event: bytes) -> bool:
        """Look at one event; True when it goes on to the client."""
        data = event_data(event)
        if data is None:
            return True
        if data == _DONE:
            self.done = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        if "error" in obj:
            self.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            return True
        choices = obj.get("choices")
        if choices:
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if text is not None:  # "" too: a token that detokenised to nothing (a leading space piece)
                    self.content_chunks += 1
        if obj.get("usage"):
            self._usage(obj)
            if self.drop_usage_chunk and not choices:
                return False
        return True
