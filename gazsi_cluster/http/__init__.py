"""HTTP helpers shared by the edge data plane and the gateway."""

from gazsi_cluster.http.errors import error_body, install_error_handlers, to_response

__all__ = ["error_body", "install_error_handlers", "to_response"]
