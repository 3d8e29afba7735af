"""The control plane's node listing (`gazsi nodes`, /admin/nodes, `gazsi up`) shows each edge's data plane and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.service import ControlPlane
from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import InvalidRequest

pytestmark = pytest.mark.unit

FACTS = {"node_id": "edge-a", "address": "127.0.0.1", "port": 9000, "engine_backend": "fake",
         "models": ["all-MiniLM-L6-v2"], "max_batch_size": 8, "version": "0.1.0"}


def test_the_listing_carries_the_data_plane_and_its_reason(tmp_path: Path) -> None:
    cp = ControlPlane(load_settings(data_dir=str(tmp_path)))
    reason = "auto: fast front, because no CUDA GPU — 6 HTTP workers"
    cp.join({**FACTS, "dataplane": "fast", "dataplane_reason": reason}, None)
    # An edge of an older version sends no reason: it still joins, and the listing says "".
    cp.join({**FACTS, "node_id": "edge-b", "port": 9001, "dataplane": "asgi"}, None)
    listed = {n["node_id"]: n for n in cp.list_nodes()}
    assert (listed["edge-a"]["dataplane"], listed["edge-a"]["dataplane_reason"]) == ("fast", reason)
    assert (listed["edge-b"]["dataplane"], listed["edge-b"]["dataplane_reason"]) == ("asgi", "")
    assert cp.show("edge-a")["dataplane_reason"] == reason


def test_a_reason_is_bounded(tmp_path: Path) -> None:
    cp = ControlPlane(load_settings(data_dir=str(tmp_path)))
    with pytest.raises(InvalidRequest, match="dataplane_reason"):
        cp.join({**FACTS, "dataplane_reason": "x" * 257}, None)
