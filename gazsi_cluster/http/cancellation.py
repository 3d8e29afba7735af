"""A client that disconnects cancels its work (after vLLM's ``with_cancellation``).

Starlette does not cancel a handler when the client goes away; here a watcher task reads
``http.disconnect`` while the handler's own task does the work, and cancels that task when the
client leaves, so the batcher can drop the request's inputs and a relay can close its upstream.

The work runs in the caller's task, not in one of its own: racing two tasks with ``asyncio.wait``
cost each streamed LLM request two more tasks and three more trips through the event loop before
its first byte went out (issue 16's profile, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

from gazsi_cluster.errors import ClientDisconnected

__all__ = ["DisconnectWatch", "run_until_disconnect"]

T = TypeVar("T")


class DisconnectWatch:
    """Cancels the task that made it when ``receive`` says ``http.disconnect``; :meth:`stop` ends the watch.

    After a ``CancelledError`` in that task, :meth:`ours` tells whether it was this watch's doing (the
    client left) rather than someone else's (a server shutting down), and if so takes it back.

    >>> watch = DisconnectWatch(receive)                   # doctest: +SKIP
    >>> try: ...                                           # doctest: +SKIP
    ... except asyncio.CancelledError:
    ...     if not watch.ours(): raise
    ... finally: watch.stop()
    """

    __slots__ = ("_receive", "_task", "_watcher", "gone", "stopped")

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None, "DisconnectWatch needs a running task"
        self._task, self._receive = task, receive
        self.gone = self.stopped = False
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a receive that fails tells nothing about the client: leave the work alone
            return
        # Stopped means the work is over: a cancel now would hit whatever the task does next.
        if not self.stopped:
            self.gone = True
            self._task.cancel()

    def ours(self) -> bool:
        """In an ``except CancelledError``: True (and the cancellation taken back) when only the client caused it."""
        return self.gone and self._task.uncancel() == 0

    def stop(self) -> None:
        self.stopped = True
        self._watcher.cancel()


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`."""
    watch = DisconnectWatch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.ours():
            raise ClientDisconnected("the client closed the connection") from None
        raise
    finally:
        watch.stop()
