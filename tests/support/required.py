"""What a test does when something it needs is missing: skip on a developer's machine, fail in CI.

CI runs with ``GAZSI_REQUIRE_SERVICES=1`` (``.ci/run``): there a missing PostgreSQL, Redis, helm,
``unshare`` or ``../shared`` is a broken set-up, not a reason to check nothing.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["unavailable"]


def unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``, or fail it with the same words when CI requires every service."""
    if os.environ.get("GAZSI_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (GAZSI_REQUIRE_SERVICES=1: required here)")
    pytest.skip(reason)
