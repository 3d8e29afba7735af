"""What this node has: CUDA GPUs (and, in the GPU data plane, SmartNICs and DOCA).

Detection never imports heavy GPU libraries unless asked, and never raises: a node that cannot
tell falls back to the CPU/socket paths and logs why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "DOCA_GPUNETIO_LIBS",
    "MELLANOX_PCI_VENDOR",
    "DataplaneMode",
    "GpuInfo",
    "SmartNic",
    "choose_dataplane",
    "cuda_device_count",
    "describe_gpu",
    "doca_gpunetio_available",
    "find_smartnics",
    "tensorrt_importable",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    name: str
    memory_mb: int


def cuda_device_count() -> int:
    """Number of CUDA devices torch can use; 0 when torch or CUDA is missing."""
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception as exc:  # a broken driver must not take the node down
        log.warning("CUDA probe failed: %r", exc)
        return 0


def describe_gpu(index: int = 0) -> GpuInfo | None:
    if cuda_device_count() <= index:
        return None
    import torch

    props = torch.cuda.get_device_properties(index)
    return GpuInfo(name=str(props.name), memory_mb=int(props.total_memory // (1024 * 1024)))


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


# -- GPU data plane prerequisites ---------------------------------------------------------

# Mellanox (now NVIDIA networking): every ConnectX / BlueField function carries this PCI vendor id.
MELLANOX_PCI_VENDOR = "0x15b3"
# DOCA GPUNetIO's runtime library; its soname has moved between DOCA releases, so try each.
DOCA_GPUNETIO_LIBS = ("libdoca_gpunetio.so", "libdoca_gpunetio.so.2", "libdoca_gpunetio.so.1")

DataplaneMode = Literal["fast", "asgi", "gpu", "gpunetio"]


@dataclass(frozen=True, slots=True)
class SmartNic:
    """A network function of a Mellanox/NVIDIA NIC found in sysfs."""

    pci_address: str
    device_id: str
    netdevs: tuple[str, ...]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def find_smartnics(sysfs_root: str | Path = "/sys") -> list[SmartNic]:
    """PCI functions with vendor 0x15b3 that are network devices (class 0x02xxxx).

    ``sysfs_root`` lets tests point at a fake tree. Never raises: an unreadable tree is "none".

    >>> find_smartnics("/nonexistent")
    []
    """
    devices = Path(sysfs_root) / "bus" / "pci" / "devices"
    found: list[SmartNic] = []
    try:
        entries = sorted(devices.iterdir())
    except OSError:
        return found
    for dev in entries:
        if _read(dev / "vendor") != MELLANOX_PCI_VENDOR:
            continue
        # Class 0x02 is "network controller"; BlueField also exposes non-network functions.
        if not _read(dev / "class").startswith("0x02"):
            continue
        try:
            netdevs = tuple(sorted(p.name for p in (dev / "net").iterdir()))
        except OSError:
            netdevs = ()
        found.append(SmartNic(dev.name, _read(dev / "device"), netdevs))
    return found


def doca_gpunetio_available(names: Sequence[str] = DOCA_GPUNETIO_LIBS) -> bool:
    """Whether DOCA GPUNetIO's shared library can be loaded (dlopen) on this machine."""
    candidates = list(names)
    found = ctypes.util.find_library("doca_gpunetio")
    if found:
        candidates.append(found)
    for name in candidates:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def choose_dataplane(
    requested: str,
    *,
    gpus: int | None = None,
    smartnics: Sequence[SmartNic] | None = None,
    doca: bool | None = None,
    sysfs_root: str | Path = "/sys",
) -> tuple[DataplaneMode, str]:
    """Resolve ``edge.dataplane`` to the transport this node runs, and why.

    ``auto`` picks ``gpunetio`` only with a CUDA GPU, a Mellanox/NVIDIA SmartNIC and DOCA GPUNetIO
    all present; otherwise ``fast``. ``fast`` and ``asgi`` are honoured as asked; ``gpu`` without a GPU
    and ``gpunetio`` without its prerequisites fall back to ``fast``, always with the reason (logged,
    and shown in ``/readyz``). The probes can be injected (tests); unset ones are measured.

    >>> choose_dataplane("asgi")
    ('asgi', 'requested asgi')
    """
    if requested in ("fast", "asgi"):
        return _logged(requested, f"requested {requested}")  # type: ignore[arg-type]
    if requested not in ("auto", "gpu", "gpunetio"):
        raise ValueError(f"unknown data plane {requested!r}")
    n_gpu = cuda_device_count() if gpus is None else gpus
    if requested == "gpu":
        if n_gpu > 0:
            return _logged("gpu", "requested gpu; CUDA GPU present (host socket feed)")
        return _logged("fast", "requested gpu but no CUDA GPU: falling back to fast")
    nics = find_smartnics(sysfs_root) if smartnics is None else list(smartnics)
    has_doca = doca_gpunetio_available() if doca is None else doca
    missing = [what for what, ok in (
        ("no CUDA GPU", n_gpu > 0),
        (f"no SmartNIC (PCI vendor {MELLANOX_PCI_VENDOR}) in sysfs", bool(nics)),
        ("DOCA GPUNetIO library not loadable", has_doca),
    ) if not ok]
    if not missing:
        return _logged("gpunetio", f"{requested}: GPU, SmartNIC {nics[0].pci_address} and DOCA GPUNetIO present "
                               "(requests still arrive through the host socket feed: no GPUNetIO receive path yet)")
    return _logged("fast", f"{requested}: fast front, because " + "; ".join(missing))


def _logged(mode: DataplaneMode, reason: str) -> tuple[DataplaneMode, str]:
    log.info("data plane: %s (%s)", mode, reason)
    return mode, reason
