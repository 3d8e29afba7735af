"""A client's disconnect cancels its work in the handler's own task: and only its disconnect does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gazsi_cluster.errors import ClientDisconnected
from gazsi_cluster.http.cancellation import run_until_disconnect
from gazsi_cluster.http.streaming import StreamReply
from gazsi_cluster.http.wire import HttpReply

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


class _Client:
    """An ASGI ``receive`` that says ``http.disconnect`` once :meth:`leave` is called."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    def leave(self) -> None:
        self.left.set()

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}


class _Request:
    def __init__(self, client: _Client) -> None:
        self.receive = client.receive


async def test_a_disconnect_cancels_the_work_and_says_so() -> None:
    client, cancelled = _Client(), asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "done"

    asyncio.get_running_loop().call_later(0.05, client.leave)
    with pytest.raises(ClientDisconnected):
        await run_until_disconnect(_Request(client), work())  # type: ignore[arg-type]
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # taken back: the task goes on
    await asyncio.sleep(0.01)  # and nothing cancels it later


async def test_work_that_finished_is_not_cancelled_by_a_later_disconnect() -> None:
    client = _Client()

    async def work() -> str:
        return "done"

    assert await run_until_disconnect(_Request(client), work()) == "done"  # type: ignore[arg-type]
    client.leave()
    await asyncio.sleep(0.01)  # a stopped watch cancels nobody


async def test_someone_elses_cancellation_is_not_taken_for_a_disconnect() -> None:
    client = _Client()

    async def handler() -> str:
        return await run_until_disconnect(_Request(client), asyncio.sleep(30, "done"))  # type: ignore[arg-type]

    task = asyncio.ensure_future(handler())
    await asyncio.sleep(0.01)
    task.cancel()  # a server shutting down
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_stream_is_cut_and_closed_when_its_client_leaves() -> None:
    client, closed, sent = _Client(), asyncio.Event(), []

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(30)  # a silent upstream
            yield b"data: 2\n\n"
        finally:
            closed.set()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body"):
            client.leave()

    await StreamReply(HttpReply(200, stream=events()))({}, client.receive, send)
    assert closed.is_set()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_stream_read_to_its_end_is_sent_whole() -> None:
    client, sent = _Client(), []

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await StreamReply(HttpReply(200, stream=events()))({}, client.receive, send)
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b"data: [DONE]\n\n", b""]
    assert sent[-1]["more_body"] is False
