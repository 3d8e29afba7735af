from __future__ import annotations

from collections import Counter

import pytest

from gazsi_cluster.errors import NoHealthyNode
from gazsi_cluster.routing import NodeEntry, RouteRequest, RoutingTable, make_policy
from gazsi_cluster.routing.policies import LatencyEWMAPolicy

pytestmark = pytest.mark.unit

M = "all-MiniLM-L6-v2"


def node(i: int, **kw: object) -> NodeEntry:
    base: dict[str, object] = dict(node_id=f"n{i}", url=f"http://10.0.0.{i}:8000", models=(M,))
    base.update(kw)
    return NodeEntry(**base)  # type: ignore[arg-type]


def table(*nodes: NodeEntry, membership: int = 1) -> RoutingTable:
    return RoutingTable(1, membership, nodes)


def test_p2c_never_picks_the_more_loaded_of_two() -> None:
    t = table(node(1, queue_depth=50), node(2, queue_depth=0))
    p = make_policy("p2c", seed=1)
    assert {p.choose(t, RouteRequest(model=M)).node_id for _ in range(200)} == {"n2"}


def test_p2c_counts_this_clients_in_flight() -> None:
    t = table(node(1), node(2))
    p = make_policy("p2c", seed=1)
    for _ in range(5):
        p.on_start("n1")
    assert p.choose(t, RouteRequest()).node_id == "n2"


def test_p2c_spreads_over_equal_nodes() -> None:
    t = table(*(node(i) for i in range(10)))
    p = make_policy("p2c", seed=3)
    assert len({p.choose(t, RouteRequest()).node_id for _ in range(500)}) == 10


def test_model_filter_exclude_and_no_node() -> None:
    t = table(node(1, models=("other",)), node(2), node(3))
    p = make_policy("p2c", seed=1)
    got = {p.choose(t, RouteRequest(model=M, exclude=frozenset({"n2"}))).node_id for _ in range(50)}
    assert got == {"n3"}
    with pytest.raises(NoHealthyNode):
        p.choose(t, RouteRequest(model=M, exclude=frozenset({"n2", "n3"})))
    with pytest.raises(NoHealthyNode):
        p.choose(RoutingTable.empty(), RouteRequest())


def test_latency_policy_prefers_the_fast_node_it_observed() -> None:
    t = table(node(1), node(2))
    p = make_policy("latency", seed=2)
    assert isinstance(p, LatencyEWMAPolicy)
    for _ in range(5):
        p.on_start("n1")
        p.on_finish("n1", 0.200, True)
        p.on_start("n2")
        p.on_finish("n2", 0.002, True)
    assert {p.choose(t, RouteRequest()).node_id for _ in range(100)} == {"n2"}
    assert not p.pending  # starts and finishes balance


def test_affinity_prefers_zone_then_region_then_anywhere() -> None:
    t = table(node(1, region="eu", zone="eu-a"), node(2, region="eu", zone="eu-b"), node(3, region="us", zone="us-a"))
    p = make_policy("affinity", seed=1)
    assert {p.choose(t, RouteRequest(region="eu", zone="eu-b")).node_id for _ in range(50)} == {"n2"}
    assert {p.choose(t, RouteRequest(region="eu", zone="eu-z")).node_id for _ in range(50)} == {"n1", "n2"}
    assert {p.choose(t, RouteRequest(region="us")).node_id for _ in range(50)} == {"n3"}
    assert p.choose(t, RouteRequest(region="ap")).node_id in {"n1", "n2", "n3"}
    with_default = make_policy("affinity", region="us", seed=1)
    assert with_default.choose(t, RouteRequest()).node_id == "n3"


def test_consistent_hash_is_stable_and_moves_few_keys() -> None:
    nodes = [node(i) for i in range(10)]
    p = make_policy("hash")
    keys = [f"input-{i}" for i in range(2000)]
    before = {k: p.choose(table(*nodes, membership=1), RouteRequest(key=k)).node_id for k in keys}
    assert before == {k: p.choose(table(*nodes, membership=1), RouteRequest(key=k)).node_id for k in keys}
    after = {k: p.choose(table(*nodes[:-1], membership=2), RouteRequest(key=k)).node_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    # Only keys of the removed node move (about a tenth); all of them had been on n9.
    assert all(before[k] == "n9" for k in moved)
    assert 0 < len(moved) < 0.25 * len(keys)
    # Excluding a node sends its keys to the next one on the ring, others stay put.
    k = next(k for k in keys if before[k] == "n3")
    assert p.choose(table(*nodes, membership=1), RouteRequest(key=k, exclude=frozenset({"n3"}))).node_id != "n3"


def test_wrr_follows_weights() -> None:
    t = table(node(1, weight=1), node(2, weight=3))
    p = make_policy("wrr")
    counts = Counter(p.choose(t, RouteRequest()).node_id for _ in range(400))
    assert counts == {"n1": 100, "n2": 300}


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")


def test_table_round_trip() -> None:
    t = RoutingTable(7, 3, (node(1, region="eu"), node(2)))
    back = RoutingTable.from_dict(t.to_dict())
    assert back.version == 7 and back.membership_version == 3
    assert back.nodes == t.nodes
    assert back.candidates(M) == t.nodes and back.in_region("eu") == (t.nodes[0],)
