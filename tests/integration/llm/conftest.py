"""Real llama.cpp servers (tiny random GGUFs), real edges (ONNX CPU embeddings beside them) and a gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from edge_node.node import EdgeNode
from gazsi_cluster.auth import AllowAll
from gazsi_cluster.auth.factory import build_authorizer
from gazsi_cluster.config import load_settings
from gazsi_cluster.gateway import Gateway, create_gateway_app
from gazsi_cluster.routing import NodeEntry, RoutingTable
from tests.support.asgi import serve_on_loopback
from tests.support.edge import running_node
from tests.support.llm_server import LlamaServer, require_llama_cpp, write_tiny_gguf

EMBED = "all-MiniLM-L6-v2"
KEY_ENV = "test"


@pytest.fixture(scope="session")
def llama_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LlamaServer, LlamaServer]]:
    """Two llama.cpp servers, two different tiny models: ``tiny-a`` and ``tiny-b``."""
    require_llama_cpp()
    d = tmp_path_factory.mktemp("llm")
    a = LlamaServer(write_tiny_gguf(d / "a.gguf", seed=1), "tiny-a", log=d / "a.log")
    try:
        b = LlamaServer(write_tiny_gguf(d / "b.gguf", seed=2), "tiny-b", log=d / "b.log")
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


@dataclass
class Cluster:
    edge_a: EdgeNode  # tiny-a, keys required
    edge_b: EdgeNode  # tiny-b, no auth
    gateway: Gateway
    gateway_url: str
    authorizer: Any
    key: str

    def client(self, url: str | None = None, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=url or self.gateway_url, timeout=30,
                                 headers={"authorization": f"Bearer {self.key}"}, **kw)


def gateway_for(data_dir: Path, nodes: list[NodeEntry], **settings: Any) -> Gateway:
    table = RoutingTable(1, 1, tuple(nodes))
    cfg = load_settings(data_dir=str(data_dir), auth={"enabled": False}, **settings)
    return Gateway(cfg, authorizer=AllowAll(), table=lambda: table)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(llama_servers: tuple[LlamaServer, LlamaServer], tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[Cluster]:
    a, b = llama_servers
    da, db = tmp_path_factory.mktemp("edge-a"), tmp_path_factory.mktemp("edge-b")
    auth = {"key_env": KEY_ENV}
    authorizer = build_authorizer(load_settings(data_dir=str(da), auth=auth))
    # dataplane auto: edge.models makes it the asgi one (the ONNX CPU engine embeds on the same node).
    async with running_node(da, dataplane="auto", authorizer=authorizer, auth=auth,
                            edge={"models": [{"name": "tiny-a", "url": a.url}]}) as edge_a, \
            running_node(db, dataplane="auto", edge={"models": [{"name": "tiny-b", "url": b.url + "/v1"}]}) as edge_b:
        key = (await authorizer.admin.create(name="chat")).key
        gateway = gateway_for(da, [NodeEntry("edge-a", edge_a.url, models=(EMBED, "tiny-a")),
                                   NodeEntry("edge-b", edge_b.url, models=(EMBED, "tiny-b"))])
        try:
            async with serve_on_loopback(create_gateway_app(gateway)) as url:
                yield Cluster(edge_a, edge_b, gateway, url, authorizer, key)
        finally:
            await gateway.aclose()
