"""What this node has: CUDA GPUs (and, in the GPU data plane, SmartNICs and DOCA).

Detection never imports heavy GPU libraries unless asked, and never raises: a node that cannot
tell falls back to the CPU/socket paths and logs why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["GpuInfo", "cuda_device_count", "describe_gpu", "tensorrt_importable"]

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
