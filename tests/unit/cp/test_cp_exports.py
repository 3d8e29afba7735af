from __future__ import annotations

import pytest

import control_plane
import gazsi_cluster.routing

pytestmark = pytest.mark.unit

EXPECTED = {
    control_plane: {"ACTOR_NAME", "NAMESPACE", "ClusterCA", "ControlPlane", "NodeRecord", "NodeState", "Registry",
                    "Thresholds", "get_or_create_control_plane"},
    gazsi_cluster.routing: {"NodeEntry", "RetryBudget", "RouteRequest", "RoutingClient", "RoutingMetrics",
                            "RoutingPolicy", "RoutingTable", "TableFollower", "https_fetcher", "make_policy"},
}


@pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__)
def test_public_names_are_pinned(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert set(names) == EXPECTED[module]  # type: ignore[index]
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(module, name) is not None
