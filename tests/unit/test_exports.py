"""Public surfaces are pinned: changing what a package offers must be deliberate (httpx habit)."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.unit

MODULES = [
    "gazsi_cluster",
    "gazsi_cluster.errors",
    "gazsi_cluster.config",
    "gazsi_cluster.protocol",
    "gazsi_cluster.http",
    "edge_node.engines",
    "edge_node.batcher",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_are_public(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported, key=str) or len(set(exported)) == len(exported)
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ names missing {item}"


def test_root_exports() -> None:
    import gazsi_cluster

    assert set(gazsi_cluster.__all__) == {"GazsiError", "Settings", "__version__", "load_settings"}


def test_error_tree_has_one_root() -> None:
    from gazsi_cluster import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.GazsiError)
