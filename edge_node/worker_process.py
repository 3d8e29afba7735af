"""One HTTP worker process of the fast front (``python -m edge_node.worker_process``).

An entry point like ``gazsi edge serve``: it builds the node's :class:`~edge_node.node.EdgeNode` in its
worker role from the handoff the node process writes to its stdin (settings, the ring's name and layout,
this worker's pipe descriptors); the node then serves through
:class:`~edge_node.transports.fast.worker.WorkerTransport`. It lives above ``node.py`` (the transports
never import the node): :class:`~edge_node.transports.fast.front.FastTransport` starts it by the module
name the node gives it. SIGTERM drains: stop accepting, finish what is in flight (bounded), exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from edge_node.node import EdgeNode
from edge_node.transports.fast.worker import WorkerHandoff
from gazsi_cluster.config import settings_from_dump

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge_node.transports.gpu.device import HttpDevice

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: orphans possible after kill -9 of the node
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the node died before prctl took effect
        os._exit(1)


async def _serve(handoff_json: dict[str, Any], gpu_device: Callable[[int], HttpDevice] | None = None) -> None:
    settings = settings_from_dump(handoff_json["settings"])
    handoff = WorkerHandoff.from_json(handoff_json)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with EdgeNode(settings, worker=handoff, gpu_device=gpu_device):
        # Everything built so far lives as long as the process: keep it out of the collector's way,
        # or every full collection walks the imported modules again (~3 % of a worker's CPU, issue 13).
        gc.freeze()
        await stop.wait()


def main(gpu_device: Callable[[int], HttpDevice] | None = None) -> int:
    """Entry point of a worker process (started by :class:`~edge_node.transports.fast.front.FastTransport`).

    ``gpu_device``: a gpu feed process's kernels (tests: their CPU reference); unset, the CUDA ones.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the node decides
    handoff = json.loads(sys.stdin.read())
    _die_with_parent(int(handoff["parent"]))
    level = str(handoff["settings"].get("log_level", "info")).upper()
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s worker-{handoff['worker']} %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(handoff, gpu_device))
    else:
        uvloop.run(_serve(handoff, gpu_device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
