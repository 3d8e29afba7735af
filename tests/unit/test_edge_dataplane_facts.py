"""An edge tells the control plane which data plane it runs and why (``NodeFacts.dataplane_reason``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_node.engines.fake import FakeEngine
from edge_node.node import EdgeNode
from gazsi_cluster.config import load_settings
from tests.support.edge import wait_node_ready

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _node(tmp_path: Path, **edge: Any) -> EdgeNode:
    settings = load_settings(data_dir=str(tmp_path), engine={"backend": "fake"}, auth={"enabled": False},
                             cache={"enabled": False}, edge={"port": 0, **edge})
    return EdgeNode(settings, engine=FakeEngine())


async def test_the_facts_carry_the_reason_bounded(tmp_path: Path) -> None:
    node = _node(tmp_path, dataplane="asgi")
    async with node:
        await wait_node_ready(node)
        facts = node.facts()
        assert (facts.dataplane, facts.dataplane_reason) == ("asgi", "requested asgi")
        node.dataplane_reason = "x" * 1000  # whatever a probe says, the facts stay valid
        assert node.facts().dataplane_reason == "x" * 256


def test_a_fast_front_says_how_many_http_workers_serve_it(tmp_path: Path) -> None:
    node = _node(tmp_path, dataplane="fast", workers=3)  # not started: no worker process runs
    assert node.dataplane_summary() == "requested fast — 3 HTTP workers"
    assert _node(tmp_path, dataplane="fast", workers=1).dataplane_summary() == "requested fast — 1 HTTP worker"
