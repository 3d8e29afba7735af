"""The transport parity table against the real GPU data plane (CUDA kernels, ``gazsi edge serve --dataplane gpu``).

The same table and checks as the CPU run (``tests/integration/edge/test_parity.py``, where the gpu transport
runs over the CPU references of its kernels): every case answered by the asgi, fast and gpu transports with
the real ONNX engine; the byte-writing fast and gpu transports also send the same bytes for the raw exchanges.
Skipped without CuPy or a CUDA GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.edge import EdgeProcess
from tests.support.parity import ParityTable, parity_edges

cp = pytest.importorskip("cupy", reason="CuPy is not installed (GPU data plane tests need a CUDA GPU)")
try:
    _N_GPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _N_GPU = 0
pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(_N_GPU == 0, reason="no CUDA GPU on this machine")]


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EdgeProcess]]:
    nodes: dict[str, tuple[list[str], list[str] | None]] = {
        dataplane: (["--dataplane", dataplane, "--workers", "2"], None) for dataplane in ("asgi", "fast", "gpu")}
    with parity_edges(tmp_path_factory.mktemp("gazsi-data"), tmp_path_factory.mktemp("parity"), nodes) as started:
        out = "".join(started["gpu"].lines)
        assert "data plane gpu" in out, f"the node did not choose the gpu data plane:\n{out}"
        yield started


class TestGpuParity(ParityTable):
    BYTE_TRANSPORTS = ("fast", "gpu")
