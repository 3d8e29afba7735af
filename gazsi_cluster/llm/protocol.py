"""OpenAI ``/v1/chat/completions`` and ``/v1/completions`` request bodies, validated before any hop.

Only what the CDN must check is declared (model, messages/prompt, stream, the token and choice bounds);
every other field is kept as sent (``extra="allow"``) and passed to the upstream untouched.

>>> decode_llm_request("/v1/chat/completions", b'{"model":"m","messages":[{"role":"user","content":"hi"}]}').model
'm'
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from gazsi_cluster.protocol import decode_body

__all__ = ["LLM_ROUTES", "ChatMessage", "ChatRequest", "CompletionRequest", "LlmRequest", "decode_llm_request"]

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LLM_ROUTES = (CHAT, COMPLETIONS)
# Bounds a node-local server would refuse anyway; checked here so a bad request costs no hop.
_MAX_TOKENS = 1_000_000
_MAX_N = 16

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = Field(None, description="Text, or a list of content parts.")


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(..., min_length=1, max_length=256, description="Model id, as listed by /v1/models.")
    stream: StrictBool = Field(False, description="Answer as server-sent events, chunk by chunk.")
    max_tokens: StrictInt | None = Field(None, ge=1, le=_MAX_TOKENS, description="Most tokens to generate.")
    n: StrictInt | None = Field(None, ge=1, le=_MAX_N, description="Choices to generate.")
    stream_options: dict[str, Any] | None = Field(None, description="include_usage: a last chunk with usage.")

    @property
    def token_cap(self) -> int | None:
        """Most completion tokens this request may produce, when the body says (for the key's budget)."""
        cap = self.max_tokens
        extra = (self.model_extra or {}).get("max_completion_tokens")
        if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0:
            cap = extra if cap is None else min(cap, extra)
        return None if cap is None else cap * (self.n or 1)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=4096)


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(..., description="Text or token ids.")


LlmRequest = ChatRequest | CompletionRequest


def decode_llm_request(path: str, body: bytes) -> LlmRequest:
    """Validate ``body`` for ``path`` (one of :data:`LLM_ROUTES`); a 400 names the offending field."""
    if path == CHAT:
        return decode_body(ChatRequest, body)
    return decode_body(CompletionRequest, body)
