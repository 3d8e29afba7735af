"""The GAZSI control plane: node registry, liveness, routing tables, cluster CA, persistence.

Plain Python classes (unit-testable without Ray) plus a thin Ray actor wrapper
(:func:`get_or_create_control_plane`) and an HTTPS server for nodes outside Ray.
"""

from control_plane.actor import ACTOR_NAME, NAMESPACE, get_or_create_control_plane
from control_plane.ca import ClusterCA
from control_plane.registry import Registry
from control_plane.service import ControlPlane
from control_plane.state import NodeRecord, NodeState, Thresholds

__all__ = [
    "ACTOR_NAME",
    "NAMESPACE",
    "ClusterCA",
    "ControlPlane",
    "NodeRecord",
    "NodeState",
    "Registry",
    "Thresholds",
    "get_or_create_control_plane",
]
