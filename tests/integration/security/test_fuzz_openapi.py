"""schemathesis against the edge's and the gateway's OpenAPI specs: no 5xx, no crash, schema-conformant answers.

Both run for real on loopback (uvicorn with the hardened listener options): the edge on a
FakeEngine, the gateway with a fixed routing table pointing at that edge. Examples are bounded
(``FUZZ_EXAMPLES`` per operation) so the pass stays well under a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
FUZZ_EXAMPLES = int(os.environ.get("GAZSI_FUZZ_EXAMPLES", "15"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


class _Stack:
    """An edge and a gateway served from one background event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.data_dir = data_dir
        self._closers: list[Any] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def start(self) -> dict[str, str]:
        from edge_node.engines.fake import FakeEngine
        from edge_node.node import EdgeNode
        from gazsi_cluster.auth.factory import build_authorizer
        from gazsi_cluster.config import load_settings
        from gazsi_cluster.gateway import Gateway, create_gateway_app
        from gazsi_cluster.http.hardening import listener_options
        from gazsi_cluster.http.server import start_server
        from gazsi_cluster.routing import NodeEntry, RoutingTable

        settings = load_settings(data_dir=str(self.data_dir), engine={"backend": "fake"}, auth={"key_env": "test"})
        edge_auth = build_authorizer(settings)
        # The asgi transport: its OpenAPI document describes the data routes the fuzzer exercises.
        node_settings = load_settings(data_dir=str(self.data_dir), engine={"backend": "fake"},
                                      auth={"key_env": "test"}, edge={"dataplane": "asgi", "port": 0})
        node = EdgeNode(node_settings, engine=FakeEngine(), authorizer=edge_auth)
        await node.start()
        assert node.runtime is not None
        await node.runtime.wait_loaded()
        key = (await edge_auth.admin.create(name="fuzz")).key
        table = RoutingTable(1, 1, (NodeEntry("edge-1", node.url,
                                              models=(settings.engine.model,)),))
        gw_auth = build_authorizer(settings)
        await gw_auth.start()
        gateway = Gateway(settings, authorizer=gw_auth, table=lambda: table)
        gw = await start_server(create_gateway_app(gateway), "127.0.0.1", 0, **listener_options(settings.limits))
        self._closers = [gw.stop, gateway.aclose, gw_auth.close, node.stop]
        return {"edge": node.url, "gateway": f"http://127.0.0.1:{gw.port}", "key": key}

    async def stop(self) -> None:
        for close in self._closers:
            await close()

    def close(self) -> None:
        try:
            self.run(self.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    s = _Stack(tmp_path_factory.mktemp("fuzz"))
    try:
        yield s.run(s.start())
    finally:
        s.close()


_FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


def _fuzz(base: str, key: str) -> list[str]:
    """Fuzz every operation of ``base``'s spec; returns the operations exercised."""
    # schemathesis.pytest.from_fixture does not work with pytest 9, so drive Hypothesis directly.
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    done = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @_FUZZ
        def check(case: Any) -> None:
            given_headers = {k.lower() for k in (case.headers or {})}
            # A valid key unless the case tries its own Authorization: reach past auth into the handlers.
            headers = None if "authorization" in given_headers else {"Authorization": f"Bearer {key}"}
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=10)

        check()
        done.append(f"{operation.method.upper()} {operation.path}")
    return done


def test_edge_api_fuzz(stack: dict[str, str]) -> None:
    ops = _fuzz(stack["edge"], stack["key"])
    assert {"POST /v1/embeddings", "GET /inference", "GET /v1/models", "POST /admin/keys"} <= set(ops)


def test_gateway_api_fuzz(stack: dict[str, str]) -> None:
    ops = _fuzz(stack["gateway"], stack["key"])
    assert {"POST /v1/embeddings", "GET /inference", "GET /v1/route", "GET /admin/usage"} <= set(ops)
