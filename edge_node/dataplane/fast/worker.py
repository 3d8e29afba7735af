"""One HTTP worker of the fast front: uvloop + httptools, no ASGI framework on the hot path.

It answers ``GET /inference?d=``, ``POST /v1/embeddings``, ``GET /v1/models`` and ``/healthz``
with the same bodies, statuses and error shapes as the FastAPI app (validation through the same
pydantic model, errors through :func:`gazsi_cluster.http.errors.to_response`, tokenising and input
checks through :class:`EmbeddingService`), and hands token ids to the engine process through its
own slots of the shared ring. Every other path is 404 here: /readyz, /metrics and the admin API
live on the engine process's FastAPI port (``edge.admin_port``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools
import numpy as np
import orjson
from pydantic import ValidationError

from edge_node.dataplane.fast.ring import (
    CACHE_NAMES,
    DOWN_MARKER,
    ENGINE_FAILED,
    ENGINE_LOADING,
    ENGINE_UP,
    M_BATCH,
    M_CACHE,
    M_INFER_US,
    M_STATUS,
    M_T_SUBMIT,
    M_T_WOKEN,
    RingLayout,
    SlotRing,
    pack_indices,
    unpack_indices,
)
from edge_node.dataplane.gazsi_json import inference_body
from edge_node.service import EmbeddingService, openai_payload, shape_vectors
from edge_node.tokenization import TextTokenizer
from gazsi_cluster import errors as gz_errors
from gazsi_cluster.auth import Authorizer, Principal
from gazsi_cluster.config import Settings
from gazsi_cluster.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceUnavailable,
)

__all__ = ["FrontApp", "worker_main"]

log = logging.getLogger(__name__)

_Headers = list[tuple[str, str]]
_Reply = tuple[int, bytes, _Headers]


def _error_reply(exc: BaseException) -> _Reply:
    """Through the project's one error-to-HTTP function, so bodies match the FastAPI app exactly."""
    from gazsi_cluster.http.asgi import to_response

    resp = to_response(exc)
    headers = [(k, v) for k, v in resp.headers.items() if k not in ("content-length", "content-type")]
    return resp.status_code, bytes(resp.body), headers


def _http_error(status: int) -> _Reply:
    from starlette.exceptions import HTTPException

    return _error_reply(HTTPException(status))


class FrontApp:
    """Request handling of one worker, free of sockets (tests drive ``handle`` directly)."""

    def __init__(self, settings: Settings, ring: SlotRing, worker: int, req_fd: int,
                 tokenizer: TextTokenizer, authorizer: Authorizer) -> None:
        self.settings, self.ring, self.worker, self.req_fd = settings, ring, worker, req_fd
        self.authorizer = authorizer
        layout = ring.layout
        self.layout = layout
        self.model_id = settings.engine.model
        # The service object is used for its checks and tokenising only; batching is the engine's.
        self.service = EmbeddingService(
            model_id=self.model_id, tokenizer=tokenizer, batcher=cast(Any, None), limits=settings.limits,
            dimensions=layout.dimensions,
        )
        first = worker * layout.slots_per_worker
        self._free: list[int] = list(range(first + layout.slots_per_worker - 1, first - 1, -1))
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._abandoned: set[int] = set()
        self._slot_freed = asyncio.Event()
        self.timeout_s = settings.batcher.request_timeout_s

    # -- the ring -------------------------------------------------------------------------
    def on_responses(self, data: bytes) -> None:
        """Indices from the engine (or DOWN_MARKER from the supervisor)."""
        woken = time.monotonic_ns()
        meta = self.ring.meta
        for slot in unpack_indices(data):
            if slot < self.layout.slots:
                meta[slot, M_T_WOKEN] = woken
            if slot == DOWN_MARKER:
                self._fail_all()
                continue
            if slot in self._abandoned:
                self._abandoned.discard(slot)
                self._release(slot)
                continue
            fut = self._waiting.pop(slot, None)
            if fut is not None and not fut.done():
                fut.set_result(slot)

    def _fail_all(self) -> None:
        for slot in list(self._abandoned):
            self._release(slot)
        self._abandoned.clear()
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(ServiceUnavailable("the engine process died; retry shortly", retry_after=1))

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self._slot_freed.set()

    def _check_engine(self) -> None:
        state = self.ring.state
        if state == ENGINE_UP:
            return
        if state == ENGINE_LOADING:
            raise ServiceUnavailable("the model is still loading", retry_after=5)
        if state == ENGINE_FAILED:
            raise ServiceUnavailable("the model failed to load on this node", retry_after=30)
        raise ServiceUnavailable("the engine process is restarting", retry_after=1)

    def _chunks(self, seqs: list[np.ndarray]) -> list[list[np.ndarray]]:
        lay = self.layout
        chunks: list[list[np.ndarray]] = [[]]
        tokens = 0
        for seq in seqs:
            if len(seq) > lay.slot_tokens:
                raise InvalidRequest("an input is longer than a ring slot holds", param="input")
            if len(chunks[-1]) >= lay.slot_inputs or tokens + len(seq) > lay.slot_tokens:
                chunks.append([])
                tokens = 0
            chunks[-1].append(seq)
            tokens += len(seq)
        return chunks

    async def _run_chunk(self, chunk: list[np.ndarray], deadline: float, first: bool) -> tuple[np.ndarray, int, int, str | None]:
        while not self._free:
            if first:
                # Backpressure fails fast: no slot at all means this worker is saturated.
                raise Overloaded("The edge node is at capacity; retry shortly.", retry_after=1.0,
                                 queued=self.layout.slots_per_worker, limit=self.layout.slots_per_worker)
            self._slot_freed.clear()
            await self._slot_freed.wait()  # bounded by the caller's deadline
        self._check_engine()
        slot = self._free.pop()
        ring = self.ring
        ring.write_request(slot, chunk, deadline)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[slot] = fut
        ring.meta[slot, M_T_SUBMIT] = time.monotonic_ns()
        try:
            os.write(self.req_fd, pack_indices([slot]))
        except OSError:
            del self._waiting[slot]
            self._release(slot)
            raise ServiceUnavailable("the engine process is restarting", retry_after=1) from None
        try:
            await fut
        except BaseException:
            if self._waiting.pop(slot, None) is not None:
                self._abandoned.add(slot)  # the engine still owns it; freed when its answer comes
            elif not fut.done() or fut.exception() is not None:
                self._release(slot)
            raise
        try:
            meta = ring.meta[slot]
            if int(meta[M_STATUS]) != 1:
                kind, param, message, retry = ring.read_error(slot)
                cls = getattr(gz_errors, kind, gz_errors.EngineError)
                if issubclass(cls, gz_errors._RetryableError):
                    raise cls(message, param=param, retry_after=retry)
                raise cls(message, param=param)
            vectors = np.array(ring.vectors[slot, : len(chunk)])
            return vectors, int(meta[M_BATCH]), int(meta[M_INFER_US]), CACHE_NAMES.get(int(meta[M_CACHE]))
        finally:
            self._release(slot)

    async def _embed(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, int, int, str | None]:
        self._check_engine()
        deadline = time.monotonic() + self.timeout_s
        chunks = self._chunks(seqs)
        try:
            async with asyncio.timeout(self.timeout_s):
                if len(chunks) == 1:
                    return await self._run_chunk(chunks[0], deadline, True)
                parts = []
                for i, chunk in enumerate(chunks):  # sequential: bounded slots, bounded by the deadline
                    parts.append(await self._run_chunk(chunk, deadline, i == 0))
        except TimeoutError as exc:
            raise DeadlineExceeded(f"no result within the {self.timeout_s:g}s request deadline") from exc
        caches = {p[3] for p in parts}
        cache = caches.pop() if len(caches) == 1 else "partial"
        return (np.concatenate([p[0] for p in parts]), max(p[1] for p in parts), max(p[2] for p in parts), cache)

    # -- routes ---------------------------------------------------------------------------
    async def handle(self, method: str, url: bytes, headers: dict[str, str], body: bytes) -> _Reply:
        try:
            parsed = httptools.parse_url(url)
            path = parsed.path.decode("latin-1")
            query = parsed.query.decode("latin-1") if parsed.query else ""
            if path == "/inference":
                if method != "GET":
                    return _http_error(405)
                return await self._inference(query, headers)
            if path == "/v1/embeddings":
                if method != "POST":
                    return _http_error(405)
                return await self._embeddings(headers, body)
            if path == "/v1/models" and method == "GET":
                return await self._models(headers)
            if path == "/healthz" and method == "GET":
                return 200, b'{"status":"ok"}', []
            return _http_error(404)
        except Exception as exc:
            return _error_reply(exc)

    async def _authorize(self, headers: dict[str, str], model: str | None) -> Principal:
        return await self.authorizer.authorize(headers.get("authorization"), model=model)

    async def _inference(self, query: str, headers: dict[str, str]) -> _Reply:
        d = None
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "d":
                d = value  # last one wins, as Starlette's QueryParams
        if not d:
            raise InvalidRequest("query parameter d must hold the text to embed", param="d")
        self._check_engine()
        principal = await self._authorize(headers, self.model_id)
        seqs = await self.service.tokenize([d], None)
        vectors, batch, infer_us, cache = await self._embed(seqs)
        tokens = len(seqs[0])
        body = inference_body(d, tokens, vectors[0][:3], infer_us, batch)
        await self.authorizer.record_usage(principal, model=self.model_id, tokens=tokens)
        return 200, body, self._headers(principal, cache)

    async def _embeddings(self, headers: dict[str, str], body: bytes) -> _Reply:
        from fastapi.exceptions import RequestValidationError

        from gazsi_cluster.protocol import EmbeddingRequest

        if not body:  # FastAPI reports a missing body as a missing field
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RequestValidationError(
                [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}]
            ) from None
        try:
            req = EmbeddingRequest.model_validate(obj, from_attributes=True)  # FastAPI validates so (same messages)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        principal = await self._authorize(headers, req.model)
        self._check_engine()
        service = self.service
        service.check_model(req.model)
        service.check_dimensions(req.dimensions)
        from edge_node.service import normalise_input

        texts, ids = normalise_input(req.input)
        seqs = await service.tokenize(texts, ids)
        vectors, _batch, _us, cache = await self._embed(seqs)
        prompt_tokens = sum(len(s) for s in seqs)
        payload = openai_payload(shape_vectors(vectors, req.dimensions), model=self.model_id,
                                 prompt_tokens=prompt_tokens, encoding_format=req.encoding_format)
        out = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        await self.authorizer.record_usage(principal, model=self.model_id, tokens=prompt_tokens)
        return 200, out, self._headers(principal, cache)

    async def _models(self, headers: dict[str, str]) -> _Reply:
        principal = await self._authorize(headers, None)
        body = orjson.dumps({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.ring.created, "owned_by": "gazsi"}
        ]})
        return 200, body, list(principal.headers)

    @staticmethod
    def _headers(principal: Principal, cache: str | None) -> _Headers:
        out = list(principal.headers)
        if cache is not None:
            out.append(("X-Gazsi-Cache", cache))
        return out


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _render(status: int, body: bytes, headers: _Headers, keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"")),
             b"content-type: application/json", b"content-length: %d" % len(body)]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Connection(asyncio.Protocol):
    """One client connection; requests are answered in order (HTTP/1.1 pipelining safe)."""

    def __init__(self, app: FrontApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[tuple[str, bytes, dict[str, str], bytes, bool, bool]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()  # a disconnect cancels the work in flight

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_render(400, b'{"error":{"message":"Invalid HTTP request","type":'
                                                  b'"invalid_request_error","param":null,"code":null}}', [], False))
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", {}, [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= self.max_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        too_large = self._size > self.max_body
        declared = self._headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            too_large = True
        self.queue.put_nowait((method, self._url, self._headers, b"".join(self._body),
                               self.parser.should_keep_alive(), too_large))

    async def _serve(self) -> None:
        app = self.app
        while True:
            method, url, headers, body, keep_alive, too_large = await self.queue.get()
            if too_large:
                status, out, extra = _error_reply(PayloadTooLarge(f"request body exceeds {self.max_body} bytes"))
            else:
                status, out, extra = await app.handle(method, url, headers, body)
            if self.transport is None:
                return
            self.transport.write(_render(status, out, extra, keep_alive))
            if not keep_alive:
                self.transport.close()
                return


def worker_main(settings: Settings, ring_name: str, layout: RingLayout, worker: int, req_fd: int,
                resp_fd: int, port: int) -> None:
    """Entry point of worker process ``worker`` (forked by the supervisor)."""
    import socket

    import uvloop

    from gazsi_cluster.auth.factory import authorizer_for as _authorizer
    from gazsi_cluster.model import load_model_spec

    threads = settings.edge.worker_tokenizer_threads
    if threads > 0:
        # Before the tokenizer's first parallel call builds rayon's pool. Every worker otherwise
        # gets one rayon thread per core: 10 workers x 16 threads oversubscribe the host, and
        # rayon's idle threads spin (round 1 measured 4.27 ms CPU per 32-input request).
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        if threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ring = SlotRing.attach(layout, ring_name)
    cfg = settings.engine
    spec = load_model_spec(cfg.model, cfg.model_dir)
    tokenizer = TextTokenizer(spec.path, min(cfg.max_seq_len, spec.max_seq_len))
    authorizer = _authorizer(settings)

    async def main() -> None:
        start = getattr(authorizer, "start", None)
        if start is not None:
            await start()
        app = FrontApp(settings, ring, worker, req_fd, tokenizer, authorizer)
        loop = asyncio.get_running_loop()
        os.set_blocking(resp_fd, False)

        def on_readable() -> None:
            try:
                data = os.read(resp_fd, 65536)
            except BlockingIOError:
                return
            app.on_responses(data)

        loop.add_reader(resp_fd, on_readable)
        sock = socket.socket(socket.AF_INET6 if ":" in settings.edge.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((settings.edge.host, port))
        sock.listen(4096)
        max_body = settings.limits.max_body_bytes
        server = await loop.create_server(lambda: _Connection(app, max_body), sock=sock)
        try:
            await server.serve_forever()
        finally:
            close = getattr(authorizer, "close", None)
            if close is not None:
                await close()

    uvloop.run(main())
