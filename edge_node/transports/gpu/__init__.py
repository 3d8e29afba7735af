"""The GPU data plane: HTTP parse/build kernels (CuPy), control-flow modes and the CPU reference.

Nothing here imports CuPy at module top; GPU code loads on first use.
"""

from __future__ import annotations

__all__ = ["ParsedRequest", "parse_reference"]

from ._reference import ParsedRequest, parse_reference
