"""Run a scenario script inside a private network namespace that has only ``lo``, with a HOME of its own.

Ray binds to the host's address when started; inside ``unshare -n`` it can reach nothing but
loopback. The scenario's HOME is an empty directory, so nothing it does reads or writes the
user's ``~/.ray`` or data directory, and nothing an earlier test left there can help it.
The scenario prints one JSON line prefixed ``RESULT:`` that the test asserts on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.ray_env import fresh_home_env
from tests.support.required import unavailable

ROOT = Path(__file__).resolve().parents[3]


def run_scenario(script: Path, *args: str, timeout_s: float) -> dict[str, Any]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        unavailable("unshare/ip are missing: Ray's network cannot be isolated")
    quoted = " ".join(f"'{a}'" for a in (sys.executable, str(script), *args))
    proc = subprocess.run(
        ["unshare", "-n", "bash", "-c", f"ip link set lo up && exec {quoted}"],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
        env=fresh_home_env(dict(os.environ, PYTHONUNBUFFERED="1",
                                PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))),
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr[:2000]:
        unavailable(f"unshare -n is not permitted here: {proc.stderr[:500]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
    assert proc.returncode == 0 and lines, (
        f"scenario failed (rc={proc.returncode})\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return dict(json.loads(lines[-1][len("RESULT:"):]))
