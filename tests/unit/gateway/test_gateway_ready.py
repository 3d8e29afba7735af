"""The gateway stays ready while it can route: an emptied table (control plane restarting) keeps the last one."""

from __future__ import annotations

import httpx
import pytest

from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import load_settings
from gazsi_cluster.gateway import Gateway, create_gateway_app
from gazsi_cluster.routing import NodeEntry, RoutingTable

pytestmark = pytest.mark.unit


async def test_readyz_follows_routable_edges(tmp_path) -> None:
    tables = [RoutingTable.empty()]
    gw = Gateway(load_settings(data_dir=tmp_path, auth={"enabled": False}), authorizer=AllowAll(),
                 table=lambda: tables[-1])
    transport = httpx.ASGITransport(app=create_gateway_app(gw))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.get("/readyz")
        assert r.status_code == 503  # never saw an edge: not ready
        tables.append(RoutingTable(1, 1, (NodeEntry("e1", "http://127.0.0.1:9", models=("m",)),)))
        r = await c.get("/readyz")
        assert r.status_code == 200
        assert r.json()["edges"] == 1
        tables.append(RoutingTable(1, 1, ()))  # a restarted control plane's first, empty table
        r = await c.get("/readyz")
        assert r.status_code == 200
        body = r.json()
        assert body["edges"] == 0
        assert body["routable_edges"] == 1
    await gw.aclose()
