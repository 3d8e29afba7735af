"""Control-plane agents for tests that need an edge's side of join and heartbeats, without a model."""

from __future__ import annotations

from typing import Any

from edge_node.agent import EdgeAgent
from gazsi_cluster import __version__
from gazsi_cluster.config import Settings
from gazsi_cluster.protocol import NodeFacts, NodeLoad
from gazsi_cluster.routing import RoutingTable

__all__ = ["StaticLink", "agent_for_link", "facts"]


def facts(node_id: str | None = None, *, address: str = "127.0.0.1", port: int = 9000,
          model: str = "all-MiniLM-L6-v2") -> NodeFacts:
    return NodeFacts(node_id=node_id, address=address, port=port, engine_backend="fake", models=[model],
                     max_batch_size=8, version=__version__)


def agent_for_link(settings: Settings, link: Any, node_id: str, port: int, *, token: str | None = None,
                   interval_s: float | None = None) -> EdgeAgent:
    """An agent reporting an idle node (``NodeLoad()``) at ``127.0.0.1:port``."""
    return EdgeAgent(link, facts(node_id, port=port), NodeLoad, settings.control_plane, token=token,
                     interval_s=interval_s)


class StaticLink:
    """A control-plane link that hands every node the one table a test sets in ``tables["t"]`` once
    every node has its port."""

    def __init__(self, name: str, tables: dict[str, RoutingTable]) -> None:
        self.name, self.tables = name, tables

    async def join(self, facts: dict[str, Any], token: str | None) -> dict[str, Any]:
        return {"node_id": self.name, "heartbeat_interval_s": 0.2}

    async def heartbeat(self, node_id: str, load: dict[str, Any]) -> dict[str, Any]:
        return {"table_version": self.tables["t"].version if "t" in self.tables else 0}

    async def table(self, since: int) -> dict[str, Any] | None:
        table = self.tables.get("t")
        return table.to_dict() if table is not None and table.version != since else None

    async def aclose(self) -> None:
        return None
