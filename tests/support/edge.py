"""Start a real :class:`~edge_node.node.EdgeNode` on loopback for a test: any transport, any engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from edge_node.node import EdgeNode
from gazsi_cluster.config import load_settings

__all__ = ["BYTE_TRANSPORTS", "TRANSPORTS", "gazsi", "running_node", "wait_node_ready"]

# The transports that run on a CPU-only machine; the gpu one is covered in tests/gpu.
TRANSPORTS = ("asgi", "fast")
BYTE_TRANSPORTS = ("fast",)


async def wait_node_ready(node: EdgeNode, limit_s: float = 180.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not node.ready:
        if node.runtime is not None and node.runtime.state == "failed":
            raise AssertionError(f"the model failed to load: {node.runtime.load_error!r}")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"edge node not ready after {limit_s}s: {node.readiness()}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running_node(
    data_dir: Path, *, dataplane: str = "asgi", workers: int = 2, engine: Any = None, authorizer: Any = None,
    link: Any = None, wait: bool = True, edge: dict[str, Any] | None = None, auth: dict[str, Any] | None = None,
    engine_model: str | None = None, **settings: Any,
) -> AsyncIterator[EdgeNode]:
    """An edge node on 127.0.0.1 (free ports) with auth off unless ``auth`` says otherwise.

    ``engine={"backend": "onnx-cpu"}`` style settings go in ``settings``; an ``engine`` object (FakeEngine)
    is injected as is.
    """
    settings.setdefault("engine", {"backend": "fake" if engine is not None else "onnx-cpu", "onnx_threads": 1})
    if engine_model is not None:
        settings["engine"] = {**settings["engine"], "model": engine_model}
    edge_cfg = {"dataplane": dataplane, "port": 0, "workers": workers, **(edge or {})}
    cfg = load_settings(data_dir=str(data_dir), edge=edge_cfg, auth=auth or {"enabled": False}, **settings)
    node = EdgeNode(cfg, engine=engine, authorizer=authorizer, link=link)
    async with node:
        if wait:
            await wait_node_ready(node)
        yield node


class EdgeProcess:
    """``gazsi edge serve`` as users run it, in a subprocess; ``url`` and ``admin`` parsed from its output."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None, ready_path: str = "/readyz",
                 limit_s: float = 180.0, command: list[str] | None = None) -> None:
        """``command`` replaces ``gazsi edge serve`` (it gets the same ``--data-dir``, ``--port`` and ``args``)."""
        import os
        import re
        import subprocess
        import sys
        import time

        import httpx

        prefix = command or [sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", "edge", "serve"]
        cmd = [*prefix, "--data-dir", str(data_dir), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "GAZSI_ENGINE__ONNX_THREADS": "1", **(env or {})})
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        url = None
        deadline = time.monotonic() + limit_s
        while url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"serving on (https?://[\d.]+:\d+)(?:; operator app .* on port (\d+))?", line)
            if m:
                url = m[1]
                self.admin = f"http://127.0.0.1:{m[2]}" if m[2] else url
        assert url, "gazsi edge serve did not start:\n" + "".join(self.lines)
        self.url = url
        import threading

        # Keep reading its output so a chatty node never blocks on a full pipe.
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),  # type: ignore[union-attr]
                         daemon=True).start()
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.admin + ready_path, timeout=2, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("gazsi edge serve never became ready:\n" + "".join(self.lines))

    def stop(self, timeout_s: float = 30.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout_s)
        return int(self.proc.returncode)


def gazsi(*args: str) -> str:
    """Run the ``gazsi`` command as a user would (a subprocess); its stdout, or the test fails with its output."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gazsi_cli.main", "--log-level", "warning", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
