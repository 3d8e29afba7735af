"""The fast front's parent process: creates the ring and pipes, forks the engine and the workers,
restarts what dies, and takes everything down on SIGTERM/SIGINT.

Children are forked (the supervisor imports no GPU library, so forking is safe) and ask the
kernel to SIGKILL them if the supervisor dies (PR_SET_PDEATHSIG): no orphans, even after
``kill -9`` of the parent. The supervisor keeps every pipe end open so a restarted engine or
worker reuses them; when the engine dies it marks the ring down and writes DOWN_MARKER into each
worker's response pipe, so requests in flight get 503 at once and new ones get 503 until the
new engine is up. After ``max_engine_restarts`` deaths in a minute the engine stays down and the
workers answer 503 (clean failure) until an operator restarts the node.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from edge_node.dataplane.fast.ring import (
    DOWN_MARKER,
    ENGINE_DOWN,
    ENGINE_FAILED,
    ENGINE_LOADING,
    RingLayout,
    SlotRing,
    pack_indices,
)
from gazsi_cluster.config import Settings

__all__ = ["FastFront", "serve_fast"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):  # not Linux: orphans are then possible after a SIGKILL of the parent
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(target: Callable[..., None], args: tuple[Any, ...], parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    target(*args)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FastFront:
    def __init__(self, settings: Settings, *, max_engine_restarts: int = 3) -> None:
        from gazsi_cluster.model import load_model_spec

        self.settings = settings
        edge = settings.edge
        self.workers = max(1, edge.workers)
        spec = load_model_spec(settings.engine.model, settings.engine.model_dir)
        self.layout = RingLayout(self.workers, edge.ring_slots_per_worker, edge.ring_slot_inputs,
                                 edge.ring_slot_tokens, spec.dimensions)
        self.max_engine_restarts = max_engine_restarts
        self._ctx = mp.get_context("fork")
        self.ring: SlotRing | None = None
        self.engine: Any = None
        self.worker_procs: list[Any] = []
        self.generation = 0
        self._engine_deaths: list[float] = []
        self._stopping = False
        self._port_holder: socket.socket | None = None
        self.port = edge.port
        self.admin_port = edge.admin_port if edge.admin_port is not None else edge.port + 1

    def start(self) -> None:
        host = self.settings.edge.host
        if self.port == 0:
            # Hold the chosen port in a bound (not listening) SO_REUSEPORT socket so every worker
            # binds the same number; only listening sockets receive connections.
            holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind((host, 0))
            self._port_holder, self.port = holder, int(holder.getsockname()[1])
            if self.settings.edge.admin_port in (None, 0):
                self.admin_port = _free_port(host)
        self.ring = SlotRing.create(self.layout)
        self.req_r, self.req_w = os.pipe()
        self.resp = [os.pipe() for _ in range(self.workers)]
        self._start_engine()
        for i in range(self.workers):
            self.worker_procs.append(self._start_worker(i))

    def _start_engine(self) -> None:
        from edge_node.dataplane.fast.engine_proc import engine_main

        assert self.ring is not None
        self.generation += 1
        self.ring.set_state(ENGINE_LOADING, generation=self.generation)
        args = (self.settings, self.ring.name, self.layout, self.req_r, [w for _, w in self.resp],
                self.generation, self.admin_port)
        self.engine = self._ctx.Process(target=_child, args=(engine_main, args, os.getpid()), name="gazsi-engine")
        self.engine.start()

    def _start_worker(self, i: int) -> Any:
        from edge_node.dataplane.fast.worker import worker_main

        assert self.ring is not None
        args = (self.settings, self.ring.name, self.layout, i, self.req_w, self.resp[i][0], self.port)
        proc = self._ctx.Process(target=_child, args=(worker_main, args, os.getpid()), name=f"gazsi-worker-{i}")
        proc.start()
        return proc

    def poll(self) -> None:
        """Restart what died (call periodically)."""
        if self._stopping or self.ring is None:
            return
        if self.engine is not None and not self.engine.is_alive():
            code = self.engine.exitcode
            self.engine.join()
            self.engine = None
            log.error("engine process exited with %s; in-flight requests get 503", code)
            self.ring.set_state(ENGINE_DOWN)
            for _, w in self.resp:
                with contextlib.suppress(OSError):
                    os.write(w, pack_indices([DOWN_MARKER]))
            now = time.monotonic()
            self._engine_deaths = [t for t in self._engine_deaths if now - t < 60] + [now]
            if len(self._engine_deaths) > self.max_engine_restarts:
                log.error("engine died %d times in a minute; staying down (503)", len(self._engine_deaths))
                self.ring.set_state(ENGINE_FAILED)
            else:
                self._start_engine()
        for i, proc in enumerate(self.worker_procs):
            if not proc.is_alive():
                proc.join()
                log.error("worker %d exited with %s; restarting it", i, proc.exitcode)
                self.worker_procs[i] = self._start_worker(i)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        procs = [p for p in [*self.worker_procs, self.engine] if p is not None]
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for fd in [self.req_r, self.req_w, *(f for pair in self.resp for f in pair)]:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._port_holder is not None:
            self._port_holder.close()


def serve_fast(settings: Settings) -> int:
    """Run the fast front until SIGTERM/SIGINT (``gazsi edge serve`` with ``edge.workers`` > 0)."""
    front = FastFront(settings)
    stop = False

    def _on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    front.start()
    host = settings.edge.host
    print(f"gazsi edge: fast front with {front.workers} workers on http://{host}:{front.port} "
          f"(admin/readyz/metrics on http://{host}:{front.admin_port})", flush=True)
    try:
        while not stop:
            time.sleep(0.05)
            front.poll()
    finally:
        front.stop()
    return 0
