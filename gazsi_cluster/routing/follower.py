"""Keeps a local copy of the control plane's routing table fresh (pull, with push as a shortcut).

``fetch(since_version)`` returns the table as a dict, or None when nothing changed; it may be
an HTTPS call (:func:`https_fetcher`) or a Ray actor call. A failed pull keeps the last table:
a control plane restart must not drop traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from gazsi_cluster.routing.table import RoutingTable

__all__ = ["Fetch", "TableFollower", "https_fetcher"]

log = logging.getLogger(__name__)

Fetch = Callable[[int], Awaitable[dict[str, Any] | None]]


def https_fetcher(http: httpx.AsyncClient, base_url: str, *, headers: dict[str, str] | None = None) -> Fetch:
    """A fetch function pulling ``GET {base_url}/v1/table?since=N`` (204 = unchanged)."""

    async def fetch(since: int) -> dict[str, Any] | None:
        resp = await http.get(f"{base_url.rstrip('/')}/v1/table", params={"since": since}, headers=headers)
        if resp.status_code == 204:
            return None
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    return fetch


class TableFollower:
    def __init__(self, fetch: Fetch, *, refresh_s: float = 0.25, initial: RoutingTable | None = None) -> None:
        self._fetch = fetch
        self.refresh_s = refresh_s
        self.table = initial or RoutingTable.empty()
        self._task: asyncio.Task[None] | None = None
        self._watchers: list[Callable[[RoutingTable], object]] = []
        self.errors = 0

    def __call__(self) -> RoutingTable:
        return self.table

    def watch(self, callback: Callable[[RoutingTable], object]) -> None:
        """Call ``callback`` with every new table. A routing client uses it to remember the last non-empty
        table from the first pull on, not only from its first request: on the H100 (2026-12-06) gateway
        replicas that had routed nothing yet answered 503 while a saturated edge was briefly out of the
        table, and the replicas that had routed kept serving."""
        self._watchers.append(callback)
        callback(self.table)

    def _set(self, table: RoutingTable) -> None:
        self.table = table
        for callback in self._watchers:
            callback(table)

    def push(self, table: RoutingTable) -> None:
        """Accept a pushed table (ignored when older than the one held)."""
        if table.version >= self.table.version or table.membership_version == 0:
            self._set(table)

    async def refresh(self) -> None:
        data = await self._fetch(self.table.version)
        if data is not None:
            # A restarted control plane counts versions from 1 again: accept a lower version then.
            self._set(RoutingTable.from_dict(data))

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.debug("routing table pull failed (keeping version %d): %s", self.table.version, exc)
            await asyncio.sleep(self.refresh_s)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gazsi-table-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
