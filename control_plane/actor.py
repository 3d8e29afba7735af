"""The thin Ray wrapper: a detached, named, restartable actor in the ``gazsi`` namespace.

All logic is in :class:`ControlPlane`; the actor forwards calls. With ``serve_https`` it also
runs the HTTPS API for nodes outside the Ray cluster. Ray is imported inside functions so the
package imports without it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from control_plane.service import ControlPlane
from gazsi_cluster.config import Settings

__all__ = ["ACTOR_NAME", "NAMESPACE", "ControlPlaneActor", "get_or_create_control_plane"]

ACTOR_NAME = "gazsi-control-plane"
NAMESPACE = "gazsi"


class ControlPlaneActor:
    """Async actor body (decorated with ``ray.remote`` in :func:`get_or_create_control_plane`)."""

    def __init__(self, settings_json: str, serve_https: bool = False) -> None:
        self.settings = Settings.model_validate_json(settings_json)
        self.cp = ControlPlane(self.settings)
        self.serve_https = serve_https
        self._server: Any = None
        self._started: asyncio.Task[None] | None = None

    async def _ensure(self) -> None:
        # Actor constructors cannot await: start lazily, exactly once, on the first call.
        if self._started is None:
            self._started = asyncio.create_task(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        if self.serve_https:
            from control_plane.server import ControlPlaneServer

            self._server = ControlPlaneServer(self.cp)
            await self._server.start()
        else:
            await self.cp.start()

    async def ready(self) -> dict[str, Any]:
        await self._ensure()
        return {"https_url": self._server.url if self._server else None, "nodes": len(self.cp.registry.nodes)}

    async def join(self, facts: dict[str, Any], token: str | None, csr: str | None = None) -> dict[str, Any]:
        await self._ensure()
        return self.cp.join(facts, token, csr=csr)

    async def heartbeat(self, node_id: str, load: dict[str, Any]) -> dict[str, Any]:
        await self._ensure()
        return self.cp.heartbeat(node_id, load)

    async def table(self, since: int = -1) -> dict[str, Any] | None:
        await self._ensure()
        return self.cp.table_since(since)

    async def list_nodes(self) -> list[dict[str, Any]]:
        await self._ensure()
        return self.cp.list_nodes()

    async def show(self, node_id: str) -> dict[str, Any]:
        await self._ensure()
        return self.cp.show(node_id)

    async def drain(self, node_id: str) -> dict[str, Any]:
        await self._ensure()
        return self.cp.drain(node_id)

    async def remove(self, node_id: str) -> dict[str, Any]:
        await self._ensure()
        return self.cp.remove(node_id)


def get_or_create_control_plane(settings: Settings, *, serve_https: bool = False) -> Any:
    """The detached control plane actor's handle, creating it when absent (Ray must be initialised).

    >>> handle = get_or_create_control_plane(load_settings())   # doctest: +SKIP
    >>> ray.get(handle.ready.remote())                           # doctest: +SKIP
    """
    import ray

    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    remote_cls = ray.remote(ControlPlaneActor)
    # get_if_exists closes the race of two callers creating it at once; max_restarts lets Ray
    # bring it back after a crash (nodes then re-join or are restored from the database).
    return remote_cls.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=3, num_cpus=0, max_concurrency=1000,
        # Pinned (when configured) to where the HTTPS API's Service points: see control_plane.ray_resources.
        resources=dict(settings.control_plane.ray_resources) or None,
    ).remote(settings.model_dump_json(), serve_https)
