"""The ways an edge node speaks HTTP. Each only moves bytes and calls the node's one request pipeline.

``asgi`` (FastAPI + uvicorn, one process), ``fast`` (httptools worker processes over a shared-memory
ring to the engine) and ``gpu`` (CUDA kernels parse and answer HTTP). :class:`edge_node.node.EdgeNode`
picks one from ``edge.dataplane``.
"""
