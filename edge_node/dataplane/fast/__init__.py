"""The fast socket front: N uvloop/httptools worker processes feeding one engine process through a
shared-memory ring (``edge.workers`` > 0). See ``supervisor.py`` for the process layout."""

from __future__ import annotations

from edge_node.dataplane.fast.ring import RingLayout, SlotRing
from edge_node.dataplane.fast.supervisor import FastFront, serve_fast

__all__ = ["FastFront", "RingLayout", "SlotRing", "serve_fast"]
