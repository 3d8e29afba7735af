"""Two Edge replicas in one pod: one data port (SO_REUSEPORT), an operator app each.

Serve places one Edge replica per GPU, so the chart's 2-GPU pods run two nodes with the same
``edge.port``. Both used to bind ``edge.port + 1`` for their operator app, and the second one
failed to start. Now a derived operator port is the first free one above the data port; an
explicit ``edge.admin_port`` that is taken is a clear configuration error.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from edge_node.engines.fake import FakeEngine
from edge_node.node import OPERATOR_PORT_SPAN
from gazsi_cli.ports import free_port
from gazsi_cluster.errors import ConfigError
from tests.support.edge import running_node

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"


def _port_with_free_span() -> int:
    """A data port whose whole operator span is free too (nothing else of this test's machine there)."""
    for _ in range(50):
        port = free_port()
        if port + OPERATOR_PORT_SPAN < 65_536 and all(_free(port + i) for i in range(1, OPERATOR_PORT_SPAN + 1)):
            return port
    raise AssertionError("no port with a free operator span")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


async def test_two_nodes_on_one_data_port_each_get_their_own_operator_app(tmp_path) -> None:
    port = _port_with_free_span()
    edge = {"port": port}
    # Batch sizes tell the two apart in /readyz.
    async with running_node(tmp_path / "a", dataplane="fast", workers=1, engine=FakeEngine(), edge=edge,
                            batcher={"max_batch_size": 8}) as a, \
            running_node(tmp_path / "b", dataplane="fast", workers=1, engine=FakeEngine(), edge=edge,
                         batcher={"max_batch_size": 16}) as b, \
            httpx.AsyncClient(timeout=30) as c:
        assert (a.transport.port, b.transport.port) == (port, port)
        assert (a.admin_port, b.admin_port) == (port + 1, port + 2)
        for node, batch in ((a, 8), (b, 16)):
            ready = await c.get(f"http://127.0.0.1:{node.admin_port}/readyz")
            assert ready.status_code == 200, ready.text
            # Each operator app is its own node's, not a shared one.
            assert ready.json()["batcher"]["max_batch_size"] == batch
            metrics = await c.get(f"http://127.0.0.1:{node.admin_port}/metrics")
            assert metrics.status_code == 200
        # The shared data port answers (whichever replica the kernel picks).
        for i in range(4):
            r = await c.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": f"t{i}", "model": MODEL})
            assert r.status_code == 200, r.text


async def test_an_explicit_operator_port_in_use_is_a_clear_error(tmp_path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"edge.admin_port {taken} is in use"):
            async with running_node(tmp_path, dataplane="fast", workers=1, engine=FakeEngine(),
                                    edge={"admin_port": taken}, wait=False):
                pass
