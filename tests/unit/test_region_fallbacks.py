"""Nearest-region routing with failover (issue 17): the client's region, then the configured nearest
regions in order, then anywhere; a gateway routes with its configured region."""

from __future__ import annotations

import pytest

from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import load_settings
from gazsi_cluster.gateway import Gateway
from gazsi_cluster.routing import NodeEntry, RouteRequest, RoutingTable, make_policy

pytestmark = pytest.mark.unit

TABLE = RoutingTable(1, 1, tuple(
    NodeEntry(node_id, f"tunnel://{node_id}", region=region, models=("m",))
    for node_id, region in (("e1", "eu-west"), ("e2", "eu-west"), ("c1", "eu-central"), ("u1", "us-east"),
                            ("a1", "ap-south"))))
FALLBACKS = {"eu-west": ["eu-central", "us-east"]}


def test_the_near_region_first_then_the_next_nearest_then_anywhere() -> None:
    policy = make_policy("affinity", region="eu-west", fallbacks=FALLBACKS, seed=1)
    assert {policy.choose(TABLE, RouteRequest(model="m")).node_id for _ in range(50)} == {"e1", "e2"}
    order = []
    exclude: set[str] = set()
    for _ in range(3):
        node = policy.choose(TABLE, RouteRequest(model="m", exclude=frozenset(exclude | {"e1", "e2"})))
        order.append(node.region)
        exclude.add(node.node_id)
    assert order == ["eu-central", "us-east", "ap-south"]
    # A client that says where it is wins over the gateway's own region.
    assert policy.choose(TABLE, RouteRequest(model="m", region="us-east")).node_id == "u1"


def test_the_gateway_routes_with_its_configured_region_and_fallbacks(tmp_path) -> None:
    settings = load_settings(data_dir=str(tmp_path), control_plane={
        "routing_policy": "affinity", "client_region": "eu-central", "region_fallbacks": {"eu-central": ["us-east"]}})
    gateway = Gateway(settings, authorizer=AllowAll(), table=lambda: TABLE)
    assert gateway.policy.choose(TABLE, RouteRequest(model="m")).node_id == "c1"
    assert gateway.policy.choose(TABLE, RouteRequest(model="m", exclude=frozenset({"c1"}))).node_id == "u1"
