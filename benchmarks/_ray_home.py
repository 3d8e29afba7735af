"""A HOME of its own for the Ray a benchmark starts in process.

``ray.init(address="local")`` writes a token to ``~/.ray/auth_token`` when Ray runs with token auth: a
benchmark must leave the user's ``~/.ray`` as it found it (and must not lean on a token found there).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["own_ray_home"]


def own_ray_home() -> Path:
    """Point HOME at a new empty directory for this process and forget any Ray cluster named in the env."""
    home = Path(tempfile.mkdtemp(prefix="gazsi-bench-home-"))
    os.environ["HOME"] = str(home)
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    return home
