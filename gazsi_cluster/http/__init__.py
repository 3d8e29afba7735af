"""HTTP helpers shared by the edge data plane and the gateway: wire types, the renderer, the error map.

FastAPI glue lives in :mod:`gazsi_cluster.http.asgi` (imported only where an ASGI app is built).
"""

from gazsi_cluster.http.errors import error_body, error_reply
from gazsi_cluster.http.wire import Handler, HttpReply, HttpRequest, render, render_chunk, render_head

__all__ = ["Handler", "HttpReply", "HttpRequest", "error_body", "error_reply", "render", "render_chunk", "render_head"]
