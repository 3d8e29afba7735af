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
        self.errors = 0

    def __call__(self) -> RoutingTable:
        return self.table

    def push(self, table: RoutingTable) -> None:
        """Accept a pushed table (ignored when older than the one held)."""
        if table.version >= self.table.version or table.membership_version == 0:
            self.table = table

    async def refresh(self) -> None:
        data = await self._fetch(self.table.version)
        if data is not None:
            table = RoutingTable.from_dict(data)
            # A restarted control plane counts versions from 1 again: accept a lower version then.
            self.table = table

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
