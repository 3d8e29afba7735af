"""LLM traffic through the CDN (issue 16): OpenAI chat and completions, relayed with SSE streaming.

What edges and gateways share: the request models (:mod:`.protocol`), the SSE splitter and usage tap
(:mod:`.sse`), the upstream relay with its first-byte and inter-chunk timeouts (:mod:`.relay`), the
per-model metrics (:mod:`.metrics`) and the gateway's router with pre-first-byte failover (:mod:`.router`).
An edge relays to its node-local OpenAI-compatible server; a gateway relays to an edge.
"""

from gazsi_cluster.llm.metrics import LlmMetrics
from gazsi_cluster.llm.protocol import LLM_ROUTES, ChatRequest, CompletionRequest, decode_llm_request
from gazsi_cluster.llm.relay import Upstream, open_upstream, upstream_client
from gazsi_cluster.llm.router import LlmRouter
from gazsi_cluster.llm.sse import SseSplitter, UsageTap, error_event

__all__ = [
    "LLM_ROUTES",
    "ChatRequest",
    "CompletionRequest",
    "LlmMetrics",
    "LlmRouter",
    "SseSplitter",
    "Upstream",
    "UsageTap",
    "decode_llm_request",
    "error_event",
    "open_upstream",
    "upstream_client",
]
