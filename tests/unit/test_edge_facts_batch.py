"""An edge's facts say the largest batch it really runs, read when it joins (after Serve's user_config).

On the H100 and on 2 cores (2026-12-06) a saturated ``gazsi up`` edge left the routing table within two
seconds of load and stayed out while loaded: its join had reported the default ``batcher.max_batch_size``
(8), built before the replica's ``user_config`` (32 or 512) arrived, so every heartbeat under load carried
a mean batch the control plane refused as impossible. Here the control plane's own registry sits behind
the agent's link, in process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from control_plane.registry import Registry
from control_plane.state import NodeState, Thresholds
from edge_node.agent import EdgeAgent
from edge_node.node import EdgeNode
from gazsi_cluster.config import Settings, load_settings
from gazsi_cluster.protocol import NodeFacts, NodeLoad

pytestmark = pytest.mark.unit


class RegistryLink:
    def __init__(self, reg: Registry) -> None:
        self.reg = reg
        self.joins: list[NodeFacts] = []

    async def join(self, facts: dict[str, Any], token: str | None) -> dict[str, Any]:
        rec = self.reg.join(NodeFacts.model_validate(facts), token)
        self.joins.append(rec.facts)
        return {"node_id": rec.node_id, "heartbeat_interval_s": 3600}

    async def heartbeat(self, node_id: str, load: dict[str, Any]) -> dict[str, Any]:
        self.reg.heartbeat(node_id, NodeLoad.model_validate(load))
        return {"table_version": 0}

    async def table(self, since: int) -> dict[str, Any] | None:
        return None

    async def aclose(self) -> None:
        return None


def _node(tmp_path: Path, dataplane: str, **batcher: int) -> EdgeNode:
    node = EdgeNode(load_settings(data_dir=str(tmp_path), engine={"backend": "fake"}, auth={"enabled": False},
                                  edge={"dataplane": dataplane, "workers": 1}, batcher=batcher))
    node.transport.port = 18999  # type: ignore[attr-defined]  # as if started: facts carry the bound port
    return node


def test_a_fast_front_reports_its_whole_first_slot_as_a_possible_batch(tmp_path: Path) -> None:
    # The slot batcher always takes its first ring slot whole: a 32-input request is one batch of 32
    # even with batcher.max_batch_size 8.
    assert _node(tmp_path, "fast").facts().max_batch_size == 32
    assert _node(tmp_path / "a", "asgi").facts().max_batch_size == 8  # the classic batcher splits inputs
    assert _node(tmp_path / "b", "fast", max_batch_size=64).facts().max_batch_size == 64


async def _beat(agent: EdgeAgent, mean_batch: float) -> None:
    agent.load = lambda: NodeLoad(mean_batch_size=mean_batch, queue_depth=3, in_flight=40)
    await agent.beat()


async def test_facts_are_read_at_join_and_follow_a_reconfigured_batch(tmp_path: Path) -> None:
    reg = Registry(join_token=None, thresholds=Thresholds())
    link = RegistryLink(reg)
    node = _node(tmp_path, "fast")
    agent = EdgeAgent(link, node.facts, lambda: NodeLoad(), Settings().control_plane, token=None)
    node.agent = agent
    # Serve hands the replica its user_config after the node was built, before it joins.
    node.reconfigure(node.settings.model_copy(update={"batcher": node.settings.batcher.model_copy(
        update={"max_batch_size": 512})}))
    await _beat(agent, 300.0)  # joins, then a heartbeat from a busy node
    assert [f.max_batch_size for f in link.joins] == [512]
    rec = reg.get(agent.node_id)  # type: ignore[arg-type]
    assert rec.state is NodeState.HEALTHY and rec.load.mean_batch_size == 300.0
    # A later reconfigure while joined: the next beat joins again with the new facts, same node id.
    node.reconfigure(node.settings.model_copy(update={"batcher": node.settings.batcher.model_copy(
        update={"max_batch_size": 128})}))
    await _beat(agent, 100.0)
    assert [f.max_batch_size for f in link.joins] == [512, 128]
    assert reg.get(agent.node_id).state is NodeState.HEALTHY  # type: ignore[arg-type]
    await asyncio.sleep(0)


async def test_without_the_fix_the_control_plane_refuses_a_busy_nodes_heartbeat() -> None:
    # The control this file guards against: facts of max batch 8 and a mean batch of 32.
    from gazsi_cluster.errors import InvalidRequest

    reg = Registry(join_token=None, thresholds=Thresholds())
    rec = reg.join(NodeFacts(address="127.0.0.1", port=9000, engine_backend="fake", models=["m"],
                             max_batch_size=8, version="0"), None)
    with pytest.raises(InvalidRequest, match="mean_batch_size > max_batch_size"):
        reg.heartbeat(rec.node_id, NodeLoad(mean_batch_size=32.0))
