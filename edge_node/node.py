"""One edge node, assembled in one place: every entry point builds this object.

``gazsi edge serve``, the Serve ``Edge`` replica and each worker process of the fast front build an
:class:`EdgeNode` from the settings. It owns, under one lifespan (``async with node:``), the model
runtime, the authorizer and its per-key limits, the response cache, the request pipeline, the
chosen transport's listeners, the operator app, the control-plane agent and peer forwarding. The
transport is one declared setting (``edge.dataplane``), resolved from the hardware when ``auto``;
the choice and its reason are logged and shown in ``/readyz``.

    auto/fast  FastTransport: the engine here, N worker processes serve HTTP (the default)
    asgi       AsgiTransport: one FastAPI/uvicorn process serves everything
    gpu        GpuTransport: HTTP parsed and answered by CUDA kernels (gpunetio: the same, DOCA receive
               when it exists)

A worker process builds the node in its worker role (``worker=handoff``): same pipeline, same
authorizer and cache, embedding through the ring instead of a local engine.

>>> async with EdgeNode(load_settings()) as node:  # doctest: +SKIP
...     print(node.url); await node.wait_closed()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from edge_node.agent import ControlPlaneLink, EdgeAgent, HttpsLink, LoadWindow, latency_quantiles
from edge_node.embedders import BatcherEmbedder, CachedEmbedder, Embedder
from edge_node.engines import Engine
from edge_node.forwarding import PeerForwarder
from edge_node.hardware import choose_dataplane
from edge_node.inputs import InputRules
from edge_node.llm import LlmBackends
from edge_node.metrics import EngineMetrics, RequestMetrics, render_request_metrics, request_families
from edge_node.mps import MpsDaemon, start_mps
from edge_node.pipeline import EdgePipeline, ModelFacts
from edge_node.runtime import ModelRuntime
from edge_node.tokenization import TextTokenizer
from edge_node.transports.base import Transport
from gazsi_cluster import __version__
from gazsi_cluster.auth import Authorizer
from gazsi_cluster.auth.factory import attach_node_limits, authorizer_for, create_node_limits
from gazsi_cluster.auth.limits import LocalRateLimiter
from gazsi_cluster.cache import ResponseCache, build_response_cache
from gazsi_cluster.config import LimitsConfig, Settings
from gazsi_cluster.errors import ConfigError, GazsiError, ServiceUnavailable
from gazsi_cluster.model import load_model_spec
from gazsi_cluster.protocol import NodeFacts, NodeLoad
from gazsi_cluster.routing import RoutingClient, RoutingTable, make_policy
from gazsi_cluster.tls import routing_client_context

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge_node.transports.fast.worker import WorkerHandoff
    from edge_node.transports.gpu.device import HttpDevice
    from gazsi_cluster.http.server import RunningServer

__all__ = ["OPERATOR_PORT_SPAN", "EdgeNode", "Transport"]

log = logging.getLogger(__name__)

# What a fast front starts as its worker processes (``python -m``): it builds this node in its worker role.
_WORKER_MODULE = "edge_node.worker_process"
# How many ports above the data port a derived operator port may take: one per Edge replica that
# shares a data port, i.e. per GPU of the largest host (the chart's check keeps them free).
OPERATOR_PORT_SPAN = 16


class EdgeNode:
    """See the module docstring. ``engine``/``authorizer``/``link`` may be injected (tests, Serve)."""

    def __init__(
        self, settings: Settings, *, worker: WorkerHandoff | None = None, engine: Engine | None = None,
        authorizer: Authorizer | None = None, link: ControlPlaneLink | None = None, advertise: str | None = None,
        worker_module: str = _WORKER_MODULE, gpu_device: Callable[[int], HttpDevice] | None = None,
    ) -> None:
        self.settings = settings
        self._mps: MpsDaemon | None = None
        # Tests hand in the CPU reference of the GPU kernels, and a worker entry point that does the same.
        self._worker_module, self._gpu_device = worker_module, gpu_device
        self.spec = load_model_spec(settings.engine.model, settings.engine.model_dir)
        self.worker = worker
        self.created = worker.created if worker is not None else int(time.time())
        if worker is not None:
            self.dataplane = "gpu" if worker.plane == "gpu" else "fast"
            self.dataplane_reason = f"worker {worker.worker} of a {self.dataplane} front"
        else:
            # Before anything here initialises CUDA (the GPU probe does): a process joins MPS at cuInit.
            self._mps = self._start_mps(settings)
            self.dataplane, self.dataplane_reason = choose_dataplane(settings.edge.dataplane)
            if self._mps is not None and self.dataplane not in ("gpu", "gpunetio"):
                self._mps.stop()  # no GPU after all: the fast front's one engine process needs no MPS
                self._mps = None
            if settings.edge.models and self.dataplane != "asgi":
                # Chat streams run on the FastAPI/ASGI transport only (issue 16); the fast front and the GPU
                # plane keep the embedding path free of it. Said at start-up, never a silent 404 later.
                if settings.edge.dataplane != "auto":
                    raise ConfigError(f"edge.models (chat/completions) needs edge.dataplane asgi or auto; the "
                                      f"{self.dataplane} data plane does not relay LLM traffic")
                self.dataplane, self.dataplane_reason = "asgi", "edge.models lists LLM models: the asgi data plane " \
                    "relays chat and completions"
        log.info("edge node data plane: %s (%s)", self.dataplane, self.dataplane_reason)
        self.request_metrics = RequestMetrics()
        self.engine_metrics = EngineMetrics()
        self.limits_table: Any = None  # the node's shared per-key limits (fast front: every process counts once)
        self._link, self._advertise = link, advertise
        self.runtime: ModelRuntime | None = None
        self.cache: ResponseCache | None = None
        self.pipeline: EdgePipeline | None = None
        self.forwarder: PeerForwarder | None = None
        self.agent: EdgeAgent | None = None
        self.tunnel: Any = None  # edge_node.tunnel.TunnelDialer when edge.reach is tunnel
        self.ops: RunningServer | None = None
        self.draining = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._closed = asyncio.Event()
        self._load = LoadWindow()
        self._join_task: asyncio.Task[None] | None = None
        # Why this node cannot go on (the control plane refused its join); entry points stop on it.
        self.failure: GazsiError | None = None
        self._failed = asyncio.Event()
        try:
            self.authorizer: Authorizer = authorizer or self._authorizer()
            # The node's LLM models (none in a fast front's worker: that data plane does not relay them).
            self.llm = LlmBackends(settings.edge.models if worker is None else [], settings.llm, self.authorizer)
            self.transport: Transport = self._assemble(engine)
        except BaseException:
            self._stop_mps()  # a node that cannot be built leaves no daemon behind
            raise

    # -- assembly --------------------------------------------------------------------------
    @property
    def multi_process(self) -> bool:
        """The node process feeds the engine from worker processes through the ring (fast, or gpu feeds)."""
        return self.worker is None and (self.dataplane == "fast" or (
            self.dataplane in ("gpu", "gpunetio") and self.settings.edge.gpu_feed == "workers"))

    def _assemble(self, engine: Engine | None) -> Transport:
        """Pick the transport and build the pipeline the way that transport needs it."""
        settings, mode = self.settings, self.dataplane
        embedder: Embedder | None = None
        transport: Transport
        if self.worker is not None:
            from edge_node.transports.fast.worker import WorkerTransport

            worker_transport: WorkerTransport
            if self.worker.plane == "gpu":
                from edge_node.transports.gpu.worker import GpuWorkerTransport

                worker_transport = GpuWorkerTransport(self, self.worker, device=self._gpu_device)
            else:
                worker_transport = WorkerTransport(self, self.worker)
            transport, embedder = worker_transport, worker_transport.embedder
            self.request_metrics = worker_transport.metrics  # cells in the ring: the node process sums them
        else:
            self.runtime = ModelRuntime(settings, metrics=self.engine_metrics, engine=engine)
            if self.multi_process:
                from edge_node.transports.fast.front import FastTransport

                if mode != "fast":
                    from edge_node.transports.gpu.transport import refuse_tls

                    refuse_tls(settings)  # before any feed process starts
                return FastTransport(self, worker_module=self._worker_module, plane="http" if mode == "fast" else "gpu")
            embedder = BatcherEmbedder(self.runtime)
            if mode == "asgi":
                from edge_node.transports.asgi import AsgiTransport

                transport = AsgiTransport(self)
            else:
                from edge_node.transports.gpu.transport import GpuTransport

                transport = GpuTransport(self, device=self._gpu_device)
        self.cache = build_response_cache(settings)
        if self.cache is not None:
            embedder = CachedEmbedder(embedder, self.cache, f"{settings.engine.model}:{self.spec.weights_hash}")
        max_len = min(settings.engine.max_seq_len, self.spec.max_seq_len)
        self.forwarder = self._forwarder()
        self.pipeline = EdgePipeline(
            model=ModelFacts(settings.engine.model, self.spec.dimensions, self.created),
            rules=InputRules(TextTokenizer(self.spec.path, max_len), settings.limits), embedder=embedder,
            authorizer=self.authorizer, metrics=self.request_metrics, readiness=self.readiness,
            timing_header=settings.edge.timing_header, forwarder=self.forwarder, llm=self.llm,
        )
        return transport

    def _authorizer(self) -> Authorizer:
        """Per-key limits count once per node: a fast front's processes share one table, one process its own."""
        settings = self.settings
        if not settings.auth.enabled:
            return authorizer_for(settings)
        limiter: Any
        if self.worker is not None:
            self.limits_table = limiter = attach_node_limits(self.worker.limiter) if self.worker.limiter else None
        elif self.multi_process:
            self.limits_table = limiter = create_node_limits(settings)
        else:
            limiter = LocalRateLimiter(scope="node")
        return authorizer_for(settings, limiter=limiter)

    @property
    def limiter_name(self) -> str | None:
        """What a worker attaches to (the node process's table), None without auth."""
        return str(self.limits_table.name) if self.limits_table is not None else None

    def _forwarder(self) -> PeerForwarder:
        cp = self.settings.control_plane
        # edge.peer_tls is read here only: peers that require cluster client certificates (issue 18).
        client = RoutingClient(self.routing_table_or_empty, make_policy(cp.routing_policy), attempts=cp.retry_attempts,
                               timeout_s=cp.request_timeout_s, connect_timeout_s=cp.connect_timeout_s,
                               ssl_context=routing_client_context(self.settings.edge.peer_tls))
        return PeerForwarder(client, lambda: self.node_id)

    # -- lifespan --------------------------------------------------------------------------
    async def __aenter__(self) -> EdgeNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listeners up at once (``/readyz`` says 503 while the model loads); the agent joins after."""
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        try:
            await self._start_parts(stack)
        except BaseException:
            await self.stop()
            raise

    async def _start_parts(self, stack: contextlib.AsyncExitStack) -> None:
        if self.limits_table is not None:  # closed last: the owner unlinks it once every worker has gone
            stack.callback(self.limits_table.close)
        start = getattr(self.authorizer, "start", None)
        if start is not None:
            await start()
        close = getattr(self.authorizer, "close", None)
        if close is not None:
            stack.push_async_callback(close)
        if self.cache is not None:
            stack.push_async_callback(self.cache.close)
        if self.forwarder is not None:
            stack.push_async_callback(self.forwarder.aclose)
        await self.llm.start()
        stack.push_async_callback(self.llm.aclose)
        if self.runtime is not None:
            self.runtime.start(with_batcher=not self.multi_process)
            stack.push_async_callback(self.runtime.stop)
        await self.transport.start()
        stack.push_async_callback(self._stop_transport)
        if self.worker is None and self.dataplane != "asgi":
            await self._start_ops()
        link = self._link or self._https_link()
        if link is not None and self.worker is None:
            self.agent = EdgeAgent(link, self.facts, self.load, self.settings.control_plane,
                                   on_refused=self._join_refused)
            # Join only once the node can serve: a loading node in the routing table turns traffic into 503s.
            self._join_task = asyncio.create_task(self._join_when_ready(), name="gazsi-edge-join")
            stack.push_async_callback(self._stop_agent)

    async def _join_when_ready(self) -> None:
        if self.runtime is not None:
            try:
                await self.runtime.wait_loaded()
            except Exception:
                return  # a node whose model failed never joins; /readyz says why
        await self.transport.wait_ready()
        if self.agent is not None and not self.draining:
            await self.agent.start()
            if self.settings.edge.reach == "tunnel":
                await self._start_tunnel(self.agent)

    async def _start_tunnel(self, agent: EdgeAgent) -> None:
        """Dial the gateway tier once joined: the tunnel's identity is the certificate the join brought."""
        from edge_node.tunnel import TunnelDialer
        from gazsi_cluster.tls import client_context

        certs = self.settings.data_dir / "node-certs"

        def context() -> ssl.SSLContext:
            ca = self.settings.control_plane.ca_file or certs / "ca.crt"
            ctx = client_context(ca, certfile=certs / "node.crt", keyfile=certs / "node.key")
            ctx.set_alpn_protocols(["h2"])
            return ctx

        host = self.settings.edge.host if self.settings.edge.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        scheme = "https" if self.settings.edge.tls.enabled else "http"
        self.tunnel = TunnelDialer(self.settings.edge.tunnel, f"{scheme}://{host}:{self.port}", context=context,
                                   ready=lambda: agent.state == "joined")
        await self.tunnel.start()

    async def _start_ops(self) -> None:
        from edge_node.transports.asgi import create_app
        from gazsi_cluster.http.hardening import listener_options
        from gazsi_cluster.http.server import start_server

        edge = self.settings.edge
        app, options = create_app(self), listener_options(self.settings.limits, edge.tls)
        if edge.admin_port is not None or not edge.port:
            ports = [edge.admin_port or 0]
        else:
            # Serve places one Edge replica per GPU, several in one pod, all on the shared data port
            # (SO_REUSEPORT); each replica has its own operator app, so a derived port is the first
            # free one above the data port, never a second bind of port + 1.
            ports = [self.transport.port + i for i in range(1, OPERATOR_PORT_SPAN + 1)]
        for port in ports:
            try:
                self.ops = await start_server(app, edge.host, port, **options)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        else:
            asked = (f"edge.admin_port {ports[0]}" if len(ports) == 1 else
                     f"every operator port from {ports[0]} to {ports[-1]} (edge.port + 1 .. + {len(ports)})")
            raise ConfigError(f"{asked} is in use on {edge.host}: set edge.admin_port to a free port")
        if len(ports) > 1 and self.ops.port != ports[0]:
            log.info("operator app on port %d: port %d is another replica's", self.ops.port, ports[0])
        assert self._stack is not None
        self._stack.push_async_callback(self.ops.stop)

    def _https_link(self) -> ControlPlaneLink | None:
        cp = self.settings.control_plane
        if not cp.url:
            return None
        return HttpsLink(cp.url, ca_file=cp.ca_file, cert_dir=self.settings.data_dir / "node-certs")

    async def _stop_agent(self) -> None:
        if self._join_task is not None and not self._join_task.done():
            self._join_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._join_task
        if self.agent is not None:
            # Leave the routing tables first, then finish in-flight work.
            await self.agent.stop(say_goodbye=True)
        if self.tunnel is not None:  # after the goodbye: the tables no longer send anything down it
            await self.tunnel.stop()

    async def _stop_transport(self) -> None:
        await self.transport.stop(self.settings.batcher.request_timeout_s)

    async def stop(self) -> None:
        """Drain and free everything, in reverse order of start; safe to call twice."""
        self.draining = True
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            self._stop_mps()  # last, once every client process has gone (and for a node that never started)
            self._closed.set()

    @staticmethod
    def _start_mps(settings: Settings) -> MpsDaemon | None:
        edge = settings.edge
        if edge.dataplane not in ("gpu", "gpunetio") or edge.gpu_feed != "workers" or edge.models:
            return None  # one process on the GPU (or none): nothing to share
        return start_mps(edge.gpu_mps, edge.gpu_mps_engine_sm_pct)

    def _stop_mps(self) -> None:
        mps, self._mps = self._mps, None
        if mps is not None:
            mps.stop()

    def _join_refused(self, exc: GazsiError) -> None:
        self.failure = exc
        self._failed.set()

    async def wait_failed(self) -> GazsiError:
        """Return once the node cannot go on (its control plane refused it); ``gazsi edge serve`` exits then."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- facts for the outside ---------------------------------------------------------------
    @property
    def node_id(self) -> str | None:
        if self.agent is not None and self.agent.node_id:
            return self.agent.node_id
        return getattr(self.transport, "self_id", None)

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def admin_port(self) -> int:
        return self.ops.port if self.ops is not None else self.transport.port

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.edge.tls.enabled else "http"
        return f"{scheme}://{self._advertise or self.settings.edge.host}:{self.port}"

    @property
    def max_body_bytes(self) -> int:
        return self.settings.limits.max_body_bytes

    def routing_table(self) -> RoutingTable | None:
        return self.agent.table if self.agent is not None else None

    def routing_table_or_empty(self) -> RoutingTable:
        table = self.routing_table()
        if table is None:
            table = getattr(self.transport, "table", None)
        return table if table is not None else RoutingTable.empty()

    def facts(self) -> NodeFacts:
        s = self.settings
        engine = self.runtime.engine if self.runtime is not None else None
        return NodeFacts(
            node_id=None, address=self._advertise or s.edge.host, port=self.port,
            scheme="https" if s.edge.tls.enabled else "http", reach=s.edge.reach, region=s.edge.region,
            zone=s.edge.zone,
            dataplane=self.dataplane, dataplane_reason=self.dataplane_summary()[:256],
            engine_backend=engine.info.backend if engine else s.engine.backend, models=[s.engine.model, *self.llm.names()],
            max_batch_size=self.largest_batch(), version=__version__,
        )

    def largest_batch(self) -> int:
        """The most inputs one batch of this node can hold (heartbeats' mean batch never exceeds it).

        The slot batcher of the multi-process planes fills batches up to ``batcher.max_batch_size`` inputs but
        always takes its first ring slot whole, and a slot carries up to ``edge.ring_slot_inputs``.
        """
        s = self.settings
        if self.multi_process:
            return max(s.batcher.max_batch_size, s.edge.ring_slot_inputs)
        return s.batcher.max_batch_size

    def dataplane_summary(self) -> str:
        """Why this data plane, and for a fast front how many HTTP workers serve it (``gazsi up`` prints it)."""
        workers = getattr(self.transport, "workers", None) if self.worker is None else None
        if self.multi_process and isinstance(workers, list) and workers:
            kind = "GPU feed process" if self.dataplane == "gpu" else "HTTP worker"
            return f"{self.dataplane_reason} — {len(workers)} {kind}{'s' if len(workers) > 1 else ''}"
        return self.dataplane_reason

    # -- state -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        runtime_ok = self.runtime is None or self.runtime.state == "ready"
        return runtime_ok and self.transport.ready and not self.draining

    def check_health(self) -> None:
        """Raise when the node cannot serve (Serve's health check replaces the replica then)."""
        if self.runtime is not None and self.runtime.state == "failed":
            raise ServiceUnavailable("the model failed to load", retry_after=30)
        if self.runtime is not None and self.runtime.state == "ready" and not self.runtime.healthy:
            raise ServiceUnavailable("the engine is unhealthy", retry_after=5)
        self.transport.check_health()
        if self.ops is not None and not self.ops.alive:
            raise ServiceUnavailable("the operator listener stopped", retry_after=1)
        if self.failure is not None:
            raise ServiceUnavailable(f"the control plane refused this node: {self.failure.message}", retry_after=30)

    def readiness(self) -> dict[str, Any]:
        view = getattr(self.transport, "node_view", None)
        if view:
            # A worker: the node's own view (pushed each second), ready only if this worker can serve too.
            return {**view, "ready": bool(view.get("ready")) and self.ready,
                    "worker": self.transport.readiness()}
        detail: dict[str, Any] = {
            "ready": self.ready, "draining": self.draining,
            "dataplane": self.dataplane, "dataplane_reason": self.dataplane_reason,
            "node_id": self.node_id, "transport": self.transport.readiness(),
        }
        if self.agent is not None:
            detail["control_plane"] = {"state": self.agent.state, "failures": self.agent.failures}
            if self.failure is not None:
                detail["control_plane"]["error"] = self.failure.message
        if self.tunnel is not None:
            detail["tunnel"] = self.tunnel.status()
        if self.runtime is not None:
            detail.update(self.runtime.readiness())
        if "batcher" in detail["transport"]:  # the fast front's slot batcher: the live batching rules
            detail["batcher"] = detail["transport"].pop("batcher")
        status = getattr(self.authorizer, "status", None)
        if status is not None:
            detail["auth"] = status()
        if self.cache is not None:
            detail["cache"] = self.cache.status()
        return detail

    def _request_metric_parts(self) -> list[RequestMetrics]:
        """This process's request metrics and, on the fast front, every worker's (in the ring)."""
        return [self.request_metrics, *getattr(self.transport, "worker_metrics", ())]

    def render_metrics(self) -> bytes:
        """Every process's metrics in one scrape (workers' summed from their cells in the ring)."""
        parts = [self.engine_metrics.render(), render_request_metrics(self._request_metric_parts())]
        if self.llm.models:
            parts.append(self.llm.metrics.render())
        for source in (self.authorizer, self.cache):
            render = getattr(getattr(source, "metrics", source), "render", None)
            if render is not None and source is not None:
                parts.append(render())
        return b"".join(parts)

    def load(self) -> NodeLoad:
        """What heartbeats report: queue, in flight, batch size, latency and tokens over the last beat."""
        w = self._load
        elapsed = w.elapsed()
        queue_depth = in_flight = 0
        transport_load = getattr(self.transport, "load", None)
        if transport_load is not None:
            queue_depth, in_flight = transport_load()
        elif self.runtime is not None and self.runtime.batcher is not None:
            queue_depth, in_flight = self.runtime.batcher.queue_depth, self.runtime.batcher.in_flight_requests
        in_flight += self.llm.in_flight  # LLM streams count as load: p2c on gateways and peers sees them
        reg = self.engine_metrics.registry
        bsum = w.delta("bsum", reg.get_sample_value("gazsi_batch_size_sum") or 0.0)
        bcount = w.delta("bcount", reg.get_sample_value("gazsi_batch_size_count") or 0.0)
        tokens = 0.0
        buckets: list[tuple[float, float]] = []
        for metric in self._request_families():
            for sample in metric.samples:
                if sample.name == "gazsi_tokens_total":
                    tokens += sample.value
                elif sample.name.endswith("_bucket") and sample.labels.get("stage") == "total":
                    buckets.append((float(sample.labels["le"]), sample.value))
        p50, p99 = latency_quantiles(w, _merge_buckets(buckets))
        return NodeLoad(queue_depth=queue_depth, in_flight=in_flight,
                        mean_batch_size=(bsum / bcount) if bcount else 0.0, p50_ms=p50, p99_ms=p99,
                        tokens_per_s=w.delta("tokens", tokens) / elapsed, draining=self.draining)

    def _request_families(self) -> Any:
        return request_families(self._request_metric_parts())

    # -- run-time changes --------------------------------------------------------------------
    def apply_limits(self, limits: LimitsConfig) -> None:
        """New request limits, in place: the pipeline's input rules and the listeners read them per request."""
        self.settings.limits = limits
        if self.pipeline is not None:
            self.pipeline.rules.limits = limits
        apply = getattr(self.transport, "apply_limits", None)
        if apply is not None:
            apply(limits)

    def reconfigure(self, settings: Settings) -> None:
        """Batching rules and limits change without a restart (Serve ``user_config``)."""
        largest = self.largest_batch()
        self.settings.batcher = settings.batcher
        if self.agent is not None and self.largest_batch() != largest:
            self.agent.rejoin()  # the control plane's facts (largest batch, routing weight) follow
        if self.runtime is not None:
            self.runtime.reconfigure(settings.batcher)
        self.apply_limits(settings.limits)
        reconfigure = getattr(self.transport, "reconfigure", None)
        if reconfigure is not None:
            reconfigure()

def _merge_buckets(buckets: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sum the cumulative bucket counts of several processes (same ``le`` bounds)."""
    merged: dict[float, float] = {}
    for le, count in buckets:
        merged[le] = merged.get(le, 0.0) + count
    return sorted(merged.items())
