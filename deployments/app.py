"""App builders for ``serve deploy deployments/<profile>.yaml`` (Serve wiring only).

``build_app(args)`` binds the
Gateway ingress with the Edge deployment (replicas get or create the detached control plane
actor). ``args`` come from the config's ``args:`` block:
``profile`` (cpu | gpu) and optional ``settings`` overrides (same shape as the YAML settings).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments._settings import replica_settings
from deployments.edge import EdgeDeployment
from deployments.gateway import GatewayDeployment

__all__ = ["build_app"]


def build_app(args: dict[str, Any]) -> Application:
    profile = str(args.get("profile", "cpu"))
    if profile not in ("cpu", "gpu"):
        raise ValueError(f"profile must be cpu or gpu, got {profile!r}")
    overrides: dict[str, Any] = dict(args.get("settings") or {})
    # Validate now: a bad override fails `serve deploy` at once instead of crash-looping replicas.
    replica_settings(profile, overrides)
    # @serve.deployment turns the classes into Deployments at run time; mypy sees the classes.
    edge = EdgeDeployment.bind(profile, overrides)  # type: ignore[attr-defined]
    app: Application = GatewayDeployment.bind(edge, profile, overrides)  # type: ignore[attr-defined]
    return app
