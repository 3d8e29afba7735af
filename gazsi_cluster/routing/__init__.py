"""Routing shared by gateways and edges: table snapshots, policies, the failover client.

It lives in the shared core because both sides route (a gateway to an edge, an overloaded
edge to a peer) and ``edge_node`` must not import ``control_plane``.
"""

from gazsi_cluster.routing.client import RetryBudget, RoutingClient
from gazsi_cluster.routing.follower import TableFollower, https_fetcher
from gazsi_cluster.routing.metrics import RoutingMetrics
from gazsi_cluster.routing.policies import RouteRequest, RoutingPolicy, make_policy
from gazsi_cluster.routing.table import NodeEntry, RoutingTable

__all__ = [
    "NodeEntry",
    "RetryBudget",
    "RouteRequest",
    "RoutingClient",
    "RoutingMetrics",
    "RoutingPolicy",
    "RoutingTable",
    "TableFollower",
    "https_fetcher",
    "make_policy",
]
