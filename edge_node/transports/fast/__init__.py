"""The fast front: N httptools worker processes feeding the node's engine through a shared-memory ring."""

from edge_node.transports.fast.front import FastTransport, default_workers
from edge_node.transports.fast.ring import RingLayout, SlotRing

__all__ = ["FastTransport", "RingLayout", "SlotRing", "default_workers"]
