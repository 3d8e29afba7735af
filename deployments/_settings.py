"""How a replica gets its settings.

Layers, lowest first: the profile's defaults, ``GAZSI_*`` env (what the chart and operators
set), the app's ``args.settings`` from the Serve config, then ``user_config`` at run time.
"""

from __future__ import annotations

from typing import Any

from gazsi_cluster.config import Settings, load_settings

PROFILES: dict[str, dict[str, Any]] = {
    # Edge listeners take a free port unless env pins one (the chart pins 8100 for its Service).
    "cpu": {"engine": {"backend": "onnx-cpu"}, "edge": {"port": 0}},
    "gpu": {"engine": {"backend": "auto", "max_batch_size": 512}, "gateway": {"host": "0.0.0.0"},
            "edge": {"port": 0, "host": "0.0.0.0", "ring_slots_per_worker": 256}},
}


def replica_settings(profile: str, overrides: dict[str, Any] | None = None) -> Settings:
    return load_settings(defaults=PROFILES.get(profile, {}), **(overrides or {}))


def apply_user_config(settings: Settings, user_config: dict[str, Any]) -> Settings:
    """A new Settings with the Serve ``user_config`` sections (batcher, limits, …) applied."""
    return load_settings(**{**settings.model_dump(), **{
        k: ({**getattr(settings, k).model_dump(), **v} if isinstance(v, dict) else v)
        for k, v in user_config.items()
    }})
