"""Where the NAT test's ``nft`` is: Debian's nftables unpacked by scripts/bootstrap into ``.venv/nft``.

nftables is not installed on these machines and the tests may not download; ``dpkg -x`` of the .debs
gives a binary that works unprivileged inside ``unshare -rn`` once its libraries are on LD_LIBRARY_PATH.
``GAZSI_NFT`` names another nft binary (one on PATH needs no library path).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["nft_command"]

ROOT = Path(__file__).resolve().parents[2]


def nft_command() -> tuple[list[str], dict[str, str]] | None:
    """``(argv prefix, extra env)`` to run nft, or None when bootstrap did not fetch it and none is on PATH.

    >>> argv, env = nft_command() or ([], {})   # doctest: +SKIP
    """
    override = os.environ.get("GAZSI_NFT") or shutil.which("nft")
    if override:
        return [override], {}
    # The worktree's own .venv, else the venv of the interpreter running the tests (a shared checkout's).
    for base in (ROOT / ".venv", Path(sys.prefix)):
        root = base / "nft" / "root"
        binary = root / "usr" / "sbin" / "nft"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)], {"LD_LIBRARY_PATH": str(root / "usr" / "lib" / "x86_64-linux-gnu")}  # amd64 .debs
    return None
