"""``edge.gpu_sync`` reaches the CUDA context, and ``edge.gpu_mps`` runs a real MPS daemon (skipped without a GPU).

The schedule flag used to go through ``cupy.cuda.runtime.setDeviceFlags``, which CuPy does not have: every feed
process of ``gpu_sync: blocking`` died at start on the H100 (2026-12-06). Each check runs in a fresh
interpreter, as a feed process is one, so no CUDA context exists before the flag is set.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

cp = pytest.importorskip("cupy", reason="CuPy is not installed (GPU data plane tests need a CUDA GPU)")
try:
    _N_GPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _N_GPU = 0
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120),
              pytest.mark.skipif(_N_GPU == 0, reason="no CUDA GPU on this machine")]

_FLAGS = """
import ctypes, sys
from edge_node.transports.gpu.device import SCHEDULE_FLAGS, set_schedule
set_schedule(sys.argv[1])
import cupy
cupy.zeros(1).sum()  # the primary context is active now
cuda = ctypes.CDLL("libcuda.so.1")
flags, active = ctypes.c_uint(), ctypes.c_int()
assert cuda.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active)) == 0
print(flags.value & 7, SCHEDULE_FLAGS[sys.argv[1]], active.value)
"""


@pytest.mark.parametrize("sync", ["spin", "yield", "blocking"])
def test_gpu_sync_sets_the_primary_contexts_schedule(sync: str) -> None:
    out = subprocess.run([sys.executable, "-c", _FLAGS, sync], capture_output=True, text=True, check=True).stdout
    got, want, active = (int(x) for x in out.split())
    assert active == 1 and got == want, out


def test_a_real_mps_daemon_starts_serves_a_client_and_quits() -> None:
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("nvidia-cuda-mps-control is not on PATH")
    code = ("from edge_node.mps import start_mps; d = start_mps('on'); import subprocess, sys; "
            "r = subprocess.run([sys.executable, '-c', 'import cupy; print(int(cupy.arange(5).sum()))'], "
            "capture_output=True, text=True); "
            "s = subprocess.run(['nvidia-cuda-mps-control'], input='get_server_list\\n', capture_output=True, "
            "text=True, env=dict(__import__('os').environ)); d.stop(); print(r.stdout.strip(), bool(s.stdout.strip()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=90).stdout
    total, server = out.split()
    assert total == "10" and server == "True", out  # the client ran, through an MPS server of the node's daemon
