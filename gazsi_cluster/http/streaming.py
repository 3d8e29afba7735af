"""A streamed reply on an ASGI server, cancelled the moment its client disconnects.

Starlette's ``StreamingResponse`` notices a client that left only when its next write fails (ASGI
2.4 servers such as uvicorn), so a stream waiting on a silent upstream would hold that upstream for
as long as it stays silent. Here a :class:`~gazsi_cluster.http.cancellation.DisconnectWatch` reads
``http.disconnect`` while the body is pumped in the response's own task, and a disconnect cancels
that task at once; the stream's own ``finally`` closes what it holds (the upstream request). Each
write waits for the server's flow control, so a slow reader slows the pump instead of growing a buffer.

>>> return StreamReply(reply)  # from a FastAPI route  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.responses import Response

from gazsi_cluster.http.asgi import reply_response
from gazsi_cluster.http.cancellation import DisconnectWatch
from gazsi_cluster.http.wire import HttpReply

__all__ = ["StreamReply", "reply_or_stream"]


class StreamReply(Response):
    """An ASGI response for an :class:`HttpReply` with ``stream``."""

    def __init__(self, reply: HttpReply) -> None:
        assert reply.stream is not None
        self.reply = reply
        self.status_code = reply.status
        self.media_type = reply.content_type
        self.background = None
        self.init_headers(dict(reply.headers))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stream = self.reply.stream
        assert stream is not None
        watch = DisconnectWatch(receive)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.ours():
                raise
            # The client left: the stream was cut where it waited; nothing more to tell.
        except OSError:
            pass  # a write to a client that left
        finally:
            watch.stop()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def reply_or_stream(reply: HttpReply) -> Response:
    """The ASGI response for ``reply``: streamed when it has a stream, whole otherwise."""
    if reply.stream is not None:
        return StreamReply(reply)
    return reply_response(reply)
