"""The failover client gateways and edges route requests with.

A request goes to the node the policy picks; on a connect error, a timeout, or a node
answering 503 / overloaded-429 it is retried on another node (embeddings are idempotent),
at most ``attempts`` nodes per request and within a retry budget shared by all requests (so
a sick cluster is not hit by a retry storm). A node that failed is quarantined locally for a
few seconds, so traffic leaves it before the control plane's table does. Optional hedging:
after ~p95 of observed latency a second copy goes to another node; the loser is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gazsi_cluster.errors import NoHealthyNode
from gazsi_cluster.routing._pool import PooledSender
from gazsi_cluster.routing._transport import HttpxSender, Response, Sender, SendError
from gazsi_cluster.routing.metrics import RoutingMetrics
from gazsi_cluster.routing.policies import RouteRequest, RoutingPolicy
from gazsi_cluster.routing.table import NodeEntry, RoutingTable

__all__ = ["RetryBudget", "RoutingClient"]

log = logging.getLogger(__name__)


class RetryBudget:
    """Retries allowed = ``ratio`` x recent requests + ``min_per_s`` (Finagle's retry budget).

    A token bucket: each request deposits ``ratio`` tokens, each retry spends one; the floor
    refills at ``min_per_s`` so a quiet client can still retry.
    """

    def __init__(self, *, ratio: float = 0.2, min_per_s: float = 10.0, cap: float = 100.0) -> None:
        self.ratio, self.min_per_s, self.cap = ratio, min_per_s, cap
        self._tokens = cap
        self._at = time.monotonic()

    def deposit(self) -> None:
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.cap, self._tokens + (now - self._at) * self.min_per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class _Failed(Exception):
    """One attempt failed in a way another node may not (connect error, timeout, 503)."""

    def __init__(self, node: NodeEntry, reason: str, response: Response | None = None) -> None:
        super().__init__(reason)
        self.node, self.reason, self.response = node, reason, response


def _retryable_status(resp: Response) -> bool:
    if resp.status_code in (502, 503, 504):
        return True
    if resp.status_code == 429:
        # Only the edge's admission queue is worth another node; a per-key rate limit is not.
        with contextlib.suppress(Exception):
            return bool(resp.json().get("error", {}).get("code") == "overloaded")
    return False


class RoutingClient:
    """Send a request to the best node, failing over and hedging as configured.

    >>> client = RoutingClient(lambda: table, make_policy("p2c"))            # doctest: +SKIP
    >>> resp = await client.request("POST", "/v1/embeddings", json=body, model="all-MiniLM-L6-v2")  # doctest: +SKIP
    """

    def __init__(
        self,
        table: Callable[[], RoutingTable],
        policy: RoutingPolicy,
        *,
        http: Any | None = None,
        attempts: int = 3,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 0.5,
        hedge: bool = False,
        hedge_min_s: float = 0.002,
        quarantine_s: float = 3.0,
        budget: RetryBudget | None = None,
        metrics: RoutingMetrics | None = None,
        ssl_context: Any | None = None,
    ) -> None:
        self._table = table
        self.policy = policy
        # ``http``: an httpx.AsyncClient to send through (tests); default per-node keep-alive pools (_pool).
        # ``ssl_context``: for https:// edges, e.g. tls.cluster_client_context (mTLS inside the cluster).
        self.sender: Sender = (
            HttpxSender(http) if http is not None
            else PooledSender(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, ssl_context=ssl_context)
        )
        self.attempts = attempts
        self.hedge = hedge
        self.hedge_min_s = hedge_min_s
        self.quarantine_s = quarantine_s
        self.budget = budget or RetryBudget()
        self.metrics = metrics
        self._down: dict[str, float] = {}
        self._last_nonempty: RoutingTable | None = None
        self._latencies: deque[float] = deque(maxlen=512)
        self._p95 = 0.05
        self._since_p95 = 0

    async def aclose(self) -> None:
        await self.sender.aclose()

    # -- state ---------------------------------------------------------------------------------
    def quarantined(self) -> set[str]:
        now = time.monotonic()
        for node_id in [k for k, until in self._down.items() if until <= now]:
            del self._down[node_id]
        return set(self._down)

    @property
    def hedge_delay_s(self) -> float:
        return max(self.hedge_min_s, self._p95)

    def _observe(self, latency_s: float) -> None:
        self._latencies.append(latency_s)
        self._since_p95 += 1
        if self._since_p95 >= 32:  # recompute the percentile now and then, not per request
            self._since_p95 = 0
            ordered = sorted(self._latencies)
            self._p95 = ordered[int(0.95 * (len(ordered) - 1))]

    def routable_table(self) -> RoutingTable:
        """The table decisions use: the current one, or the last non-empty one when it is empty."""
        table = self._table()
        if len(table):
            self._last_nonempty = table
            return table
        return self._last_nonempty if self._last_nonempty is not None else table

    def pick(self, req: RouteRequest) -> NodeEntry:
        """One routing decision (no I/O), skipping locally quarantined nodes when others remain.

        When the table has no node at all, the last table that had one is used: a lone edge
        whose heartbeat ran late under load (suspect, so out of the table for a moment) still
        serves, and a control plane that is restarting does not stop traffic. A node that is
        really gone fails to connect and is quarantined like any other.
        """
        table = self.routable_table()
        if table is not self._table() and self.metrics is not None:
            self.metrics.stale_table.inc()
        down = self.quarantined() if self._down else None  # none quarantined: the usual case, no set built
        if down:
            try:
                node = self.policy.choose(table, RouteRequest(req.model, req.key, req.region, req.zone,
                                                              {*req.exclude, *down}))
            except NoHealthyNode:
                node = self.policy.choose(table, req)  # everyone looks down: try anyway
        else:
            node = self.policy.choose(table, req)
        if self.metrics is not None:
            self.metrics.decisions.labels(self.policy.name).inc()
        return node

    # -- requests ------------------------------------------------------------------------------
    async def _attempt(self, node: NodeEntry, method: str, path: str, kwargs: Mapping[str, Any]) -> Response:
        self.policy.on_start(node.node_id)
        started = time.perf_counter()
        ok = False
        try:
            resp = await self.sender.send(method, node.url.rstrip("/") + path, **kwargs)
        except SendError as exc:
            raise _Failed(node, str(exc)) from exc
        finally:
            elapsed = time.perf_counter() - started
        try:
            if _retryable_status(resp):
                raise _Failed(node, f"HTTP {resp.status_code}", resp)
            ok = True
            self._observe(elapsed)
            return resp
        finally:
            self.policy.on_finish(node.node_id, elapsed, ok)

    def report_failure(self, node: NodeEntry, reason: str) -> None:
        """A caller that sends on its own (the LLM relay's streams) reports a node that failed: quarantined alike."""
        self._failed(_Failed(node, reason))

    def _failed(self, failed: _Failed) -> None:
        self._down[failed.node.node_id] = time.monotonic() + self.quarantine_s
        log.info("node %s failed (%s); trying another", failed.node.node_id, failed.reason)
        if self.metrics is not None:
            self.metrics.failures.labels(failed.reason.split(":")[0]).inc()

    async def _in_turn(self, method: str, path: str, req: RouteRequest, kwargs: Mapping[str, Any]) -> Response:
        """Without hedging: one attempt at a time, awaited in this task (no task and ``wait`` per request,
        ~12 % of a direct gateway's CPU), the same failover rules as :meth:`request`."""
        tried = set(req.exclude)
        launched = 0
        last: _Failed | None = None
        while True:
            try:
                node = self.pick(RouteRequest(req.model, req.key, req.region, req.zone, frozenset(tried)))
            except NoHealthyNode:
                if not launched:
                    raise NoHealthyNode("no healthy node is available", retry_after=1.0, model=req.model) from None
                break
            tried.add(node.node_id)
            if launched and self.metrics is not None:
                self.metrics.retries.inc()
            launched += 1
            try:
                return await self._attempt(node, method, path, kwargs)
            except _Failed as failed:
                last = failed
                self._failed(failed)
            if not (launched < self.attempts and self.budget.try_spend()):
                break
        return self._last_answer(last, launched, req.model)

    async def request(
        self,
        method: str,
        path: str,
        *,
        model: str | None = None,
        key: str | bytes | None = None,
        region: str | None = None,
        zone: str | None = None,
        exclude: Iterable[str] = (),
        **kwargs: Any,
    ) -> Response:
        """Send ``method path`` (``content``/``json``/``params``/``headers`` in ``kwargs``) with failover.

        Returns the first good response, or the last node's error response when every try
        answered 503/overloaded; raises :class:`NoHealthyNode` when no node could be reached.
        """
        self.budget.deposit()
        if not self.hedge:
            return await self._in_turn(method, path, RouteRequest(model, key, region, zone, frozenset(exclude)),
                                       kwargs)
        tried: set[str] = set(exclude)
        tasks: dict[asyncio.Task[Response], NodeEntry] = {}
        launched = 0
        hedged = False
        last: _Failed | None = None

        def launch() -> bool:
            nonlocal launched
            try:
                node = self.pick(RouteRequest(model, key, region, zone, frozenset(tried)))
            except NoHealthyNode:
                return False
            tried.add(node.node_id)
            launched += 1
            tasks[asyncio.create_task(self._attempt(node, method, path, kwargs))] = node
            return True

        if not launch():
            raise NoHealthyNode("no healthy node is available", retry_after=1.0, model=model)
        try:
            while tasks:
                wait_s = self.hedge_delay_s if self.hedge and not hedged and launched < self.attempts else None
                done, _ = await asyncio.wait(tasks, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the hedge timer fired before any answer
                    hedged = True
                    if launch() and self.metrics is not None:
                        self.metrics.hedges.inc()
                    continue
                for task in done:
                    tasks.pop(task)
                    try:
                        return task.result()
                    except _Failed as failed:
                        last = failed
                        self._failed(failed)
                        retried = not tasks and launched < self.attempts and self.budget.try_spend() and launch()
                        if retried and self.metrics is not None:
                            self.metrics.retries.inc()
        finally:
            for task in tasks:  # the hedging loser, or attempts left when one succeeded
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
        return self._last_answer(last, launched, model)

    @staticmethod
    def _last_answer(last: _Failed | None, launched: int, model: str | None) -> Response:
        """After every attempt failed: the last node's error response, or NoHealthyNode when none answered."""
        if last is not None and last.response is not None:
            return last.response
        # The reason names the node's address: it goes to the log and context, never to the client (issue 9).
        reason = last.reason if last else "none"
        log.warning("no node answered after %d attempt(s): %s", launched, reason)
        raise NoHealthyNode(
            f"no node answered after {launched} attempt(s)", retry_after=1.0, model=model, reason=reason,
        )
