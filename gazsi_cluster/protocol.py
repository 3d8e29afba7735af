"""Wire models: OpenAI embeddings, GAZSI ``/inference``, models list, errors, node facts and load.

Requests are validated strictly (wrong types are 4xx, never coerced silently); responses are
built as plain dicts on the hot path and these models document their shape in OpenAPI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from gazsi_cluster.errors import InvalidRequest

__all__ = [
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorDetail",
    "InferenceResponse",
    "ModelCard",
    "ModelList",
    "NodeFacts",
    "NodeLoad",
    "Usage",
    "decode_body",
    "invalid_request",
    "plain_embedding_request",
]

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body, as OpenAI defines it.

    ``input`` is a string, a list of strings, a list of token ids, or a list of token-id lists.
    """

    model_config = ConfigDict(extra="allow")

    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        ..., description="Text or token ids to embed; a list embeds each item."
    )
    model: StrictStr = Field(..., description="Model id, as listed by /v1/models.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64 = little-endian float32 bytes, as OpenAI's client expects."
    )
    dimensions: StrictInt | None = Field(
        None, description="Truncate each embedding to this many dimensions and renormalise."
    )
    user: str | None = Field(None, description="Ignored; accepted for compatibility.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class InferenceResponse(BaseModel):
    """GAZSI's ``GET /inference?d=`` answer."""

    input: str
    tokens: int
    embedding_sample: list[float]
    inference_time_us: int
    batch_size: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gazsi"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class NodeFacts(BaseModel):
    """What an edge node tells the control plane when it joins."""

    model_config = ConfigDict(extra="forbid")

    node_id: str | None = Field(None, max_length=128, description="Stable id; assigned when absent.")
    address: str = Field(..., max_length=253, description="Host or IP clients reach the edge at.")
    port: int = Field(..., ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    reach: Literal["direct", "tunnel"] = Field(
        "direct", description="tunnel = gateways reach the node through its reverse tunnel, not its address.")
    region: str = Field("local", max_length=64)
    zone: str = Field("local-a", max_length=64)
    gpu_model: str | None = Field(None, max_length=128)
    gpu_memory_mb: int | None = Field(None, ge=0)
    dataplane: Literal["fast", "asgi", "gpu", "gpunetio"] = "fast"
    dataplane_reason: str = Field("", max_length=256, description="Why the node runs that data plane (shown by "
                                  "`gazsi up` and `gazsi nodes`).")
    engine_backend: str = Field(..., max_length=32)
    models: list[str] = Field(..., min_length=1, max_length=64)
    max_batch_size: int = Field(..., ge=1)
    version: str = Field(..., max_length=64)


class NodeLoad(BaseModel):
    """Load an edge reports in every heartbeat."""

    model_config = ConfigDict(extra="forbid")

    queue_depth: int = Field(0, ge=0)
    in_flight: int = Field(0, ge=0)
    mean_batch_size: float = Field(0.0, ge=0)
    p50_ms: float = Field(0.0, ge=0)
    p99_ms: float = Field(0.0, ge=0)
    tokens_per_s: float = Field(0.0, ge=0)
    gpu_memory_used_mb: float | None = Field(None, ge=0)
    gpu_utilization: float | None = Field(None, ge=0, le=100)
    cache_hit_rate: float = Field(0.0, ge=0, le=1)
    draining: bool = False


M = TypeVar("M", bound=BaseModel)


def invalid_request(errors: list[Any]) -> InvalidRequest:
    """A pydantic error list as one :class:`InvalidRequest`: the top-level field is the param (OpenAI style)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header")]
    if first.get("type") == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request.")
    msg = first.get("msg", "invalid request")
    return InvalidRequest(f"{'.'.join(loc)}: {msg}" if loc else msg, param=loc[0] if loc else None)


def decode_body(model: type[M], body: bytes) -> M:
    """Parse and validate a JSON request body; every failure is a 400 with the offending field.

    >>> decode_body(EmbeddingRequest, b'{"model": "m", "input": "hi"}').input
    'hi'
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        where = str(exc).split(" (char ")[0]
        raise InvalidRequest(f"We could not parse the JSON body of your request ({where}).") from None
    try:
        # What model_validate does with its defaults, without its Python frame (one per request).
        return cast(M, model.__pydantic_validator__.validate_python(data))
    except ValidationError as exc:
        raise invalid_request(list(exc.errors())) from None


def plain_embedding_request(data: Any) -> bool:
    """True when a decoded body is certainly a valid :class:`EmbeddingRequest` of the common shape: one
    string ``input``, a string ``model``, and ``encoding_format``, ``dimensions``, ``user`` absent or of
    their strict types. False means "ask pydantic" (the body may still be valid, e.g. a list ``input``),
    so the errors and their 400 bodies always come from the model. A gateway forwards the raw bytes and
    needs only ``model`` and ``dimensions``: ~3 % of its CPU per request was this model's validation.

    >>> plain_embedding_request({"model": "m", "input": "hi"}), plain_embedding_request({"model": "m", "input": 5})
    (True, False)
    """
    if type(data) is not dict or type(data.get("input")) is not str or type(data.get("model")) is not str:
        return False
    fmt = data.get("encoding_format", "float")
    dims = data.get("dimensions")
    user = data.get("user")
    return (type(fmt) is str and fmt in ("float", "base64")
            and (dims is None or type(dims) is int) and (user is None or type(user) is str))
