"""Issue 16's "done when", over the real membership path: two ``gazsi edge serve --llm`` processes, each in
front of its own llama.cpp server with a different model, join a control plane over HTTPS; their
heartbeats carry the models; a gateway routing on the control plane's table serves both models to the
official ``openai`` client (streaming) and embeddings from the same nodes, and refuses an unknown model.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.server import ControlPlaneServer
from control_plane.service import ControlPlane
from gazsi_cluster.auth import AllowAll
from gazsi_cluster.config import load_settings
from gazsi_cluster.gateway import Gateway, create_gateway_app
from gazsi_cluster.routing import RoutingTable
from gazsi_cluster.tls import create_deployment_certs
from tests.support.asgi import serve_on_loopback
from tests.support.edge import EdgeProcess
from tests.support.llm_server import LlamaServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "join-s3cret-0123456789"
ADMIN = "admin-s3cret"
EMBED = "all-MiniLM-L6-v2"


async def test_two_edges_two_models_one_gateway_over_the_control_plane(
    llama_servers: tuple[LlamaServer, LlamaServer], tmp_path: Path,
) -> None:
    a, b = llama_servers
    tls = create_deployment_certs(tmp_path / "tls")
    ca_dir = tmp_path / "cp" / "ca"
    ca_dir.mkdir(parents=True, mode=0o700)
    shutil.copy(tls.ca_cert, ca_dir / "ca.crt")
    shutil.copy(tls.ca_key, ca_dir / "ca.key")
    server = ControlPlaneServer(ControlPlane(load_settings(
        data_dir=str(tmp_path / "cp"), control_plane={"join_token": TOKEN, "admin_token": ADMIN, "port": 0})))
    await server.start()
    edges: list[EdgeProcess] = []
    try:
        join = ["--backend", "fake", "--no-auth", "--control-plane", server.url, "--join-token", TOKEN,
                "--ca-file", str(tls.ca_cert), "--advertise", "127.0.0.1"]
        for name, llama in (("tiny-a", a), ("tiny-b", b)):
            edges.append(await asyncio.to_thread(EdgeProcess, tmp_path / name, *join, "--llm", f"{name}={llama.url}"))
        async with httpx.AsyncClient(base_url=server.url, verify=ssl.create_default_context(cafile=str(tls.ca_cert)),
                                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as admin:
            deadline = time.monotonic() + 20
            table: dict[str, Any] = {}
            while time.monotonic() < deadline:
                table = (await admin.get("/v1/table")).json()
                if len(table["nodes"]) == 2:
                    break
                await asyncio.sleep(0.1)
            models = sorted(tuple(n["models"]) for n in table["nodes"])
            assert models == [(EMBED, "tiny-a"), (EMBED, "tiny-b")], table
            nodes = await admin.get("/admin/nodes")
            assert {n["dataplane"] for n in nodes.json()["data"]} == {"asgi"}  # chosen for the LLM models
        routing = RoutingTable.from_dict(table)
        gateway = Gateway(load_settings(data_dir=str(tmp_path / "gw"), auth={"enabled": False}),
                          authorizer=AllowAll(), table=lambda: routing)
        try:
            async with serve_on_loopback(create_gateway_app(gateway)) as url:
                await _use_both_models(url)
        finally:
            await gateway.aclose()
    finally:
        for edge in edges:
            await asyncio.to_thread(edge.stop)
        await server.stop()


async def _use_both_models(url: str) -> None:
    from openai import AsyncOpenAI, NotFoundError

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    try:
        assert {m.id async for m in client.models.list()} == {EMBED, "tiny-a", "tiny-b"}
        for model in ("tiny-a", "tiny-b"):
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
            parts = [chunk async for chunk in stream]
            assert all(p.model == model for p in parts)
            assert sum(1 for p in parts if p.choices and p.choices[0].delta.content is not None) == 4
        done = await client.completions.create(model="tiny-b", prompt="once", max_tokens=3)
        assert done.usage is not None and done.usage.completion_tokens == 3
        with pytest.raises(NotFoundError) as info:
            await client.chat.completions.create(model="tiny-z", messages=[{"role": "user", "content": "hi"}])
        assert info.value.code == "model_not_found"
        vec = await client.embeddings.create(model=EMBED, input="hello")
        assert len(vec.data[0].embedding) == 384
    finally:
        await client.close()
