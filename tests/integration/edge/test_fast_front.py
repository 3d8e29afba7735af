"""The fast front as a process tree (`gazsi edge serve --dataplane fast`): workers that die come back,
shutdown drains and leaves no orphans, run-time limits reach every worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.edge import EdgeProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MODEL = "all-MiniLM-L6-v2"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _workers(pid: int) -> list[int]:
    return [p for p in _children(pid) if b"edge_node.worker_process" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(pred: Callable[[], bool], limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _fast(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> EdgeProcess:
    return EdgeProcess(tmp_path / "data", "--dataplane", "fast", "--workers", "2", "--backend", "fake", "--no-auth",
                       *extra, env=env)


def test_a_dead_worker_is_replaced_and_the_node_keeps_serving(tmp_path: Path) -> None:
    edge = _fast(tmp_path)
    try:
        before = _workers(edge.proc.pid)
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        # Connections the kernel had already queued on the dead worker's socket are reset with it; once
        # the socket is gone (a moment), the other worker, sharing the port, takes every new one.
        assert _wait(lambda: not _alive(before[0]), 5)
        time.sleep(0.2)
        statuses = {httpx.get(f"{edge.url}/inference?d=still%20here", timeout=5).status_code for _ in range(20)}
        assert statuses == {200}
        assert _wait(lambda: len([p for p in _workers(edge.proc.pid) if _alive(p)]) == 2, 30)
        ready = httpx.get(f"{edge.admin}/readyz", timeout=5).json()
        assert ready["ready"] is True and ready["transport"]["worker_restarts"] == 1
        assert ready["transport"]["workers_alive"] == 2
        after = [p for p in _workers(edge.proc.pid) if _alive(p)]
        assert before[0] not in after
        assert {httpx.get(f"{edge.url}/inference?d=after%20{i}", timeout=5).status_code for i in range(20)} == {200}
    finally:
        edge.stop()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_shutdown_leaves_no_orphans(tmp_path: Path, how: signal.Signals) -> None:
    edge = _fast(tmp_path)
    kids = _children(edge.proc.pid)
    assert len(_workers(edge.proc.pid)) == 2
    edge.proc.send_signal(how)
    edge.proc.wait(30)
    assert _wait(lambda: not any(_alive(k) for k in kids), 20), [k for k in kids if _alive(k)]
    if how == signal.SIGTERM:
        assert edge.proc.returncode == 0


async def test_stop_drains_requests_in_flight(tmp_path: Path) -> None:
    """Requests already accepted by the workers finish with 200 when the node stops; new ones are refused."""
    import asyncio

    from edge_node.engines.fake import FakeEngine
    from tests.support.edge import running_node

    engine = FakeEngine(delay_s=0.3)
    async with running_node(tmp_path, dataplane="fast", engine=engine, workers=2,
                            batcher={"max_batch_size": 2, "max_wait_us": 0}) as node:
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as c:
            inflight = [asyncio.create_task(c.post("/v1/embeddings", json={"input": f"slow {i}", "model": MODEL}))
                        for i in range(6)]
            await asyncio.sleep(0.2)
            stopping = asyncio.create_task(node.stop())
            codes = [(await t).status_code for t in inflight]
            await stopping
            assert codes == [200] * 6, codes
            with pytest.raises(httpx.ConnectError):
                await c.get("/healthz", timeout=2)
