"""Control-plane agents for tests that need an edge's side of join and heartbeats, without a model."""

from __future__ import annotations

from typing import Any

from edge_node.agent import EdgeAgent
from gazsi_cluster import __version__
from gazsi_cluster.config import Settings
from gazsi_cluster.protocol import NodeFacts, NodeLoad

__all__ = ["agent_for_link", "facts"]


def facts(node_id: str | None = None, *, address: str = "127.0.0.1", port: int = 9000,
          model: str = "all-MiniLM-L6-v2") -> NodeFacts:
    return NodeFacts(node_id=node_id, address=address, port=port, engine_backend="fake", models=[model],
                     max_batch_size=8, version=__version__)


def agent_for_link(settings: Settings, link: Any, node_id: str, port: int, *, token: str | None = None,
                   interval_s: float | None = None) -> EdgeAgent:
    """An agent reporting an idle node (``NodeLoad()``) at ``127.0.0.1:port``."""
    return EdgeAgent(link, facts(node_id, port=port), NodeLoad, settings.control_plane, token=token,
                     interval_s=interval_s)
