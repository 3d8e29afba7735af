"""Transport parity: one table of requests, answered by every CPU transport with the real ONNX engine.
Same status, same error bodies, same headers that matter; vectors equal to float noise (a batch's padding
may differ between runs). The byte-writing transports (the fast front and the gpu plane) also send the
very same bytes for a table of raw exchanges.

``gpu-reference`` is the gpu transport (feed, limits, its split between the kernels' hot path and the
CPU, the pipeline) with its CUDA kernels replaced by their CPU references (``tests/support/gpu_plane.py``);
``gpu-feeds`` is that plane in two feed processes that embed through the fast front's ring to the node's
engine (``edge.gpu_feed: workers``, the layout a GPU node runs); ``tests/gpu/test_gpu_parity.py`` runs the same table against the real kernels on a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.edge import TRANSPORTS, EdgeProcess
from tests.support.parity import ParityTable, parity_edges

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

GPU_REFERENCE = [sys.executable, "-m", "tests.support.gpu_plane"]


@pytest.fixture(scope="module")
def edges(edge_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EdgeProcess]]:
    nodes: dict[str, tuple[list[str], list[str] | None]] = {
        dataplane: (["--dataplane", dataplane, "--workers", "2"], None) for dataplane in TRANSPORTS}
    nodes["gpu-reference"] = ([], GPU_REFERENCE)
    # The same plane in two feed processes embedding through the fast front's ring (edge.gpu_feed=workers).
    nodes["gpu-feeds"] = (["--workers", "2"], GPU_REFERENCE)
    # And with the hot /inference answers written by the build kernel instead of the feed (edge.gpu_build=gpu).
    nodes["gpu-gpu-build"] = (["--workers", "2"], ["env", "GAZSI_EDGE__GPU_BUILD=gpu", *GPU_REFERENCE])
    with parity_edges(edge_data_dir, tmp_path_factory.mktemp("parity"), nodes) as started:
        yield started


class TestParity(ParityTable):
    BYTE_TRANSPORTS = ("fast", "gpu-reference", "gpu-feeds", "gpu-gpu-build")
