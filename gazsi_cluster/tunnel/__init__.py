"""Reverse tunnels (issue 17): an edge nobody can reach dials out to the gateway tier over mTLS and
serves HTTP/2 on that connection; the gateway relays the node's requests through it.

Both sides share :class:`TunnelConnection` (the wire: HTTP/2 with roles reversed); the gateway side is
:class:`TunnelHub` (accept, identity from the certificate, one tunnel per node) with
:class:`TunnelSender` (a routing sender for ``tunnel://<node-id>`` URLs); the edge's dialer lives in
``edge_node/tunnel.py``.
"""

from gazsi_cluster.tunnel._conn import Handler, TunnelConnection
from gazsi_cluster.tunnel.hub import (
           TUNNEL_SCHEME,
           TunnelHub,
           TunnelSender,
           peer_common_name,
           tunnel_hub,
           tunnelled_ids,
)

__all__ = ["TUNNEL_SCHEME", "Handler", "TunnelConnection", "TunnelHub", "TunnelSender", "peer_common_name",
           "tunnel_hub", "tunnelled_ids"]
