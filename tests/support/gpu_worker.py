"""A gpu feed process over the CPU references of the kernels (``python -m tests.support.gpu_worker``).

What :mod:`edge_node.worker_process` is for a node with a GPU, with :class:`tests.support.gpu_plane.ReferenceDevice`
as the kernels: ``python -m tests.support.gpu_plane --workers N`` names it as its nodes' worker entry point.
"""

from __future__ import annotations

from edge_node import worker_process
from tests.support.gpu_plane import ReferenceDevice

if __name__ == "__main__":
    raise SystemExit(worker_process.main(gpu_device=ReferenceDevice))
