"""GAZSI Cluster: a distributed inference delivery network for text embeddings.

The shared core: configuration, wire protocol, errors, HTTP helpers and the ``gazsi`` CLI.
It imports neither GPU libraries nor Ray at module top.
"""

from gazsi_cluster.config import Settings, load_settings
from gazsi_cluster.errors import GazsiError

__version__ = "0.1.0"

__all__ = ["GazsiError", "Settings", "__version__", "load_settings"]
