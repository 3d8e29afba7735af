"""A hand-written OpenAI-compatible upstream for fault cases only (the real one is tests/support/llm_server.py).

Raw asyncio, so a test decides what happens to the connection byte by byte:

    ok           a short, well-formed stream (or a whole answer)
    refuse       close the connection before answering (a failure before the first byte)
    httpNNN      answer status NNN at once (503, 429, 404, 422, ...) with an OpenAI error body
    stall_first  read the request, then answer nothing
    stall_mid    one content chunk, then silence
    die_mid      two content chunks, then the connection is cut without a last chunk
    flood        64 KB content chunks as fast as the connection takes them (``sent`` counts the bytes)

``hits`` counts requests; ``closed`` is set when a connection it answered was closed by the other side
(the relay cancelling its upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

__all__ = ["FakeUpstream"]


def _chunk(text: str | None, *, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    body = {"id": "fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\r\n\r\n"


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


class FakeUpstream:
    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.hits = 0
        self.closed = asyncio.Event()
        self.bodies: list[dict[str, object]] = []
        self.sent = 0
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            self.hits += 1
            self.bodies.append(body)
            await self._answer(body, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, body: dict[str, object], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        if mode == "refuse":
            return
        if mode.startswith("http"):
            msg = b'{"error":{"message":"fake refusal","type":"server_error","param":null,"code":null}}'
            writer.write(b"HTTP/1.1 %d Refused\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % (int(mode[4:]), len(msg)) + msg)
            await writer.drain()
            return
        if mode == "stall_first":
            await self._wait_close(reader)
            return
        if not body.get("stream"):
            msg = json.dumps({"id": "fake", "object": "chat.completion", "model": "fake", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                         % len(msg) + msg)
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(_http_chunk(_chunk("one")))
        await writer.drain()
        if mode == "flood":
            event = _http_chunk(_chunk("x" * 65_000))
            for _ in range(8192):  # 512 MB at most: far more than any buffer on the way may hold
                writer.write(event)
                await writer.drain()  # returns only while the reader keeps up: backpressure reaches us here
                self.sent += len(event)
            return
        if mode == "stall_mid":
            await self._wait_close(reader)
            return
        writer.write(_http_chunk(_chunk("two")))
        await writer.drain()
        if mode == "die_mid":
            await asyncio.sleep(0.05)
            writer.transport.abort()  # no last chunk: the stream breaks off
            return
        writer.write(_http_chunk(_chunk(None, finish="stop")))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):  # as vLLM and llama.cpp's server do
            usage = {"id": "fake", "object": "chat.completion.chunk", "model": "fake", "choices": [],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
            writer.write(_http_chunk(b"data: " + json.dumps(usage).encode() + b"\r\n\r\n"))
        writer.write(_http_chunk(b"data: [DONE]\r\n\r\n") + b"0\r\n\r\n")
        await writer.drain()

    async def _wait_close(self, reader: asyncio.StreamReader) -> None:
        """Say nothing more; return when the other side closes (the relay cancelled us)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.read(), 60)
        self.closed.set()
