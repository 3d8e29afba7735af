"""The gateway ingress: the public API in front of many edges, routed by the control plane's table."""

from gazsi_cluster.gateway.app import create_gateway_app
from gazsi_cluster.gateway.core import Gateway
from gazsi_cluster.gateway.direct import DirectGateway

__all__ = ["DirectGateway", "Gateway", "create_gateway_app"]
