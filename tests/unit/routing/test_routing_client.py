from __future__ import annotations

import asyncio

import httpx
import pytest

from gazsi_cluster.errors import NoHealthyNode
from gazsi_cluster.routing import (
    NodeEntry,
    RetryBudget,
    RouteRequest,
    RoutingClient,
    RoutingMetrics,
    RoutingTable,
    make_policy,
)

pytestmark = pytest.mark.unit

TABLE = RoutingTable(1, 1, tuple(NodeEntry(f"n{i}", f"http://n{i}.test") for i in range(3)))


def client_for(handler: object, **kw: object) -> RoutingClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return RoutingClient(lambda: TABLE, make_policy("p2c", seed=0), http=http,
                         metrics=RoutingMetrics(), **kw)  # type: ignore[arg-type]


async def test_connect_error_is_retried_on_another_node_and_quarantined() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.host)
        if req.url.host == "n0.test":
            raise httpx.ConnectError("refused", request=req)
        return httpx.Response(200, json={"ok": req.url.host})

    c = client_for(handler)
    for _ in range(30):
        assert (await c.request("POST", "/v1/embeddings", json={})).status_code == 200
    assert seen.count("n0.test") == 1  # after one failure it is skipped locally
    assert c.metrics is not None and c.metrics.retries._value.get() == 1
    assert "n0" in c.quarantined()


async def test_503_and_overloaded_retry_but_rate_limit_does_not() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "n0.test":
            return httpx.Response(503, json={"error": {"code": "unavailable"}})
        if req.url.host == "n1.test":
            return httpx.Response(429, json={"error": {"code": "overloaded"}})
        return httpx.Response(429, json={"error": {"code": "rate_limit_exceeded"}})

    c = client_for(handler)
    resp = await c.request("GET", "/x")
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limit_exceeded"


async def test_all_nodes_down_raises_no_healthy_node() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    c = client_for(handler)
    with pytest.raises(NoHealthyNode, match="3 attempt"):
        await c.request("GET", "/x")


async def test_retry_budget_bounds_retries() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.0, cap=1.0)
    assert budget.try_spend() and not budget.try_spend()

    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    c = client_for(handler, budget=RetryBudget(ratio=0.0, min_per_s=0.0, cap=0.5))
    with pytest.raises(NoHealthyNode, match="1 attempt"):
        await c.request("GET", "/x")


async def test_hedge_goes_to_second_node_and_loser_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == slow:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return httpx.Response(200, json={"host": req.url.host})

    c = client_for(handler, hedge=True, hedge_min_s=0.01)
    slow = f"{c.pick(RouteRequest()).node_id}.test"
    c.policy = make_policy("p2c", seed=0)  # same seed: the first pick goes to `slow` again
    resp = await asyncio.wait_for(c.request("GET", "/x"), 2)
    assert resp.json()["host"] != slow
    await asyncio.wait_for(cancelled.wait(), 1)
    assert c.metrics is not None and c.metrics.hedges._value.get() == 1


async def test_empty_table_falls_back_to_the_last_nonempty_one() -> None:
    tables = [TABLE]

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ok": req.url.host})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    c = RoutingClient(lambda: tables[-1], make_policy("p2c", seed=0), http=http, metrics=RoutingMetrics())
    assert (await c.request("GET", "/x")).status_code == 200
    tables.append(RoutingTable(2, 2, ()))  # every node left the table (late heartbeats, restart)
    assert (await c.request("GET", "/x")).status_code == 200
    assert c.metrics is not None and c.metrics.stale_table._value.get() == 1


async def test_empty_table_from_the_start_is_no_healthy_node() -> None:
    c = RoutingClient(lambda: RoutingTable.empty(), make_policy("p2c", seed=0),
                      http=httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))))
    with pytest.raises(NoHealthyNode):
        await c.request("GET", "/x")


async def test_a_client_watching_its_follower_keeps_a_table_it_never_routed_on() -> None:
    """A gateway replica that has routed nothing yet still falls back to the last non-empty table it was
    pulled (on the H100 such replicas answered 503 while the others kept serving)."""
    from gazsi_cluster.routing import TableFollower

    pulls = [TABLE.to_dict(), RoutingTable(2, 2, ()).to_dict()]

    async def fetch(since: int) -> dict[str, object] | None:
        return pulls.pop(0) if pulls else None

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ok": req.url.host})

    follower = TableFollower(fetch)  # type: ignore[arg-type]
    c = RoutingClient(follower, make_policy("p2c", seed=0), http=httpx.AsyncClient(
        transport=httpx.MockTransport(handler)), metrics=RoutingMetrics())
    follower.watch(lambda _table: c.routable_table())
    await follower.refresh()  # three nodes, no request routed
    await follower.refresh()  # every node left the table
    assert len(follower()) == 0
    assert (await c.request("GET", "/x")).status_code == 200
    unwatched = RoutingClient(follower, make_policy("p2c", seed=0), http=httpx.AsyncClient(
        transport=httpx.MockTransport(handler)))
    with pytest.raises(NoHealthyNode):  # the control: without watching, nothing to fall back to
        await unwatched.request("GET", "/x")
