"""The fast front (edge.workers > 0) against the FastAPI app: same bodies, same errors; engine death, shutdown.

The fast front runs as a real process tree (supervisor, engine process, 2 HTTP workers) with the
fake engine on loopback; the FastAPI reference runs in-process over the same fake engine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from edge_node.dataplane.socket.app import create_app
from edge_node.engines.fake import FakeEngine
from edge_node.runtime import EdgeRuntime
from gazsi_cluster.config import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "all-MiniLM-L6-v2"
_SETTINGS: dict[str, Any] = {
    "engine": {"backend": "fake"},
    "auth": {"enabled": False},
    "cache": {"enabled": False},
    "limits": {"max_inputs_per_request": 64, "max_body_bytes": 65536},
}


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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(pred: Any, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


class Front:
    def __init__(self, tmp: Path, **edge: Any) -> None:
        cfg = {**_SETTINGS, "data_dir": str(tmp / "data"),
               "edge": {"host": "127.0.0.1", "port": 0, "workers": 2, **edge}}
        path = tmp / "fast.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_node.dataplane.fast", "--config", str(path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"on http://127.0.0.1:(\d+) .*http://127.0.0.1:(\d+)", line)
        assert m, line
        self.url, self.admin = f"http://127.0.0.1:{m[1]}", f"http://127.0.0.1:{m[2]}"
        ok = _wait(lambda: self._ready(), 60)
        assert ok, "fast front not ready"

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/inference?d=ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    f = Front(tmp_path_factory.mktemp("fast"))
    yield f
    f.stop()


@pytest.fixture
async def reference(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(None, **{**_SETTINGS, "data_dir": str(tmp_path)})
    runtime = EdgeRuntime(settings, engine=FakeEngine())
    await runtime.start(wait=True)
    app = create_app(runtime, manage_lifespan=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ref") as client:
        yield client
    await runtime.stop()


def _norm(resp: httpx.Response) -> tuple[int, Any]:
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return resp.status_code, resp.content
    if isinstance(body, dict):
        # Engine timing and batch composition differ run to run; everything else must match.
        body.pop("inference_time_us", None)
        body.pop("batch_size", None)
    return resp.status_code, body


CASES: list[tuple[str, str, Any]] = [
    ("GET", "/inference?d=hello%20world", None),
    ("GET", "/inference?d=a&d=last%20one%20wins", None),
    ("GET", "/inference", None),
    ("GET", "/inference?d=", None),
    ("POST", "/inference?d=x", None),
    ("POST", "/v1/embeddings", {"input": "one sentence", "model": MODEL}),
    ("POST", "/v1/embeddings", {"input": ["a b c", "d e", "f"], "model": MODEL}),
    ("POST", "/v1/embeddings", {"input": [101, 2023, 2003], "model": MODEL}),
    ("POST", "/v1/embeddings", {"input": [[2023, 2003], [7592]], "model": MODEL, "encoding_format": "base64"}),
    ("POST", "/v1/embeddings", {"input": "shorter", "model": MODEL, "dimensions": 8}),
    ("POST", "/v1/embeddings", {"input": [f"sentence number {i}" for i in range(40)], "model": MODEL}),
    ("POST", "/v1/embeddings", {"input": "x", "model": "nope"}),
    ("POST", "/v1/embeddings", {"input": "x", "model": MODEL, "dimensions": 0}),
    ("POST", "/v1/embeddings", {"input": "", "model": MODEL}),
    ("POST", "/v1/embeddings", {"input": [], "model": MODEL}),
    ("POST", "/v1/embeddings", {"input": 3, "model": MODEL}),
    ("POST", "/v1/embeddings", {"model": MODEL}),
    ("POST", "/v1/embeddings", {"input": ["x"] * 65, "model": MODEL}),
    ("POST", "/v1/embeddings", {"input": [[999999]], "model": MODEL}),
    ("POST", "/v1/embeddings", b"{not json"),
    ("POST", "/v1/embeddings", b"[1, 2]"),
    ("POST", "/v1/embeddings", b"x" * 70000),
    ("GET", "/v1/embeddings", None),
    ("GET", "/no/such/route", None),
    ("GET", "/healthz", None),
]


@pytest.mark.parametrize(("method", "path", "body"), CASES, ids=[f"{m} {p[:30]} {i}" for i, (m, p, _) in enumerate(CASES)])
async def test_same_status_and_body_as_fastapi(front: Front, reference: httpx.AsyncClient,
                                               method: str, path: str, body: Any) -> None:
    content = body if isinstance(body, bytes) else (orjson.dumps(body) if body is not None else None)
    headers = {"content-type": "application/json"} if content is not None else {}
    async with httpx.AsyncClient(base_url=front.url, timeout=10) as fast:
        got = await fast.request(method, path, content=content, headers=headers)
    want = await reference.request(method, path, content=content, headers=headers)
    assert _norm(got) == _norm(want)
    assert got.headers.get("retry-after") == want.headers.get("retry-after")


def test_admin_port_serves_readyz_and_metrics(front: Front) -> None:
    assert httpx.get(f"{front.admin}/readyz", timeout=5).json()["ready"] is True
    assert b"gazsi_batch_size" in httpx.get(f"{front.admin}/metrics", timeout=5).content


def test_engine_death_gives_503_then_recovers(tmp_path: Path) -> None:
    front = Front(tmp_path)
    try:
        kids = sorted(p for p in _children(front.proc.pid)
                      if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text())
        engine, workers = kids[0], kids[1:]  # the engine is forked first
        os.kill(engine, signal.SIGKILL)
        statuses = set()

        def recovered() -> bool:
            r = httpx.get(f"{front.url}/inference?d=after%20restart", timeout=5)
            statuses.add(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["type"] == "service_unavailable"
                assert r.headers["retry-after"]
            return r.status_code == 200

        assert _wait(recovered, 60), statuses
        assert statuses <= {200, 503}
        assert all(_alive(w) for w in workers), "workers must survive the engine's death"
    finally:
        front.stop()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_shutdown_leaves_no_orphans(tmp_path: Path, how: signal.Signals) -> None:
    front = Front(tmp_path)
    kids = _children(front.proc.pid)
    assert len(kids) >= 3
    front.proc.send_signal(how)
    front.proc.wait(20)
    assert _wait(lambda: not any(_alive(k) for k in kids), 20), [k for k in kids if _alive(k)]
