"""The request pipeline of an edge node: every transport hands it an HTTP request, it hands back the reply.

Read top to bottom, a data request goes

    route -> decode -> authorize (+ per-key limits) -> readiness -> validate and tokenize
    -> reserve tokens -> embed (one :class:`~edge_node.embedders.Embedder` port) -> encode
    -> record usage -> reply

(chat and completions: route -> decode -> authorize -> model served here? -> the LLM relay, which reserves
``max_tokens``, streams from the node-local server and records usage: :mod:`edge_node.llm`),
and any error on the way becomes a reply in exactly one place (:func:`gazsi_cluster.http.errors.error_reply`),
after the peer forwarder had its chance at the errors a peer can fix (overloaded, model not here, not
ready). The FastAPI app, the fast front's workers, the GPU data plane and a reverse tunnel all call
:meth:`EdgePipeline.handle` (the GPU data plane's hot ``/inference`` path calls
:meth:`EdgePipeline.handle_inference_many` for a burst of heads: the same stages per request without the encode
one, which it does itself); none of them validates, authorises,
bills or formats errors on its own.
Modelled on TEI's one handler per route over one ``Infer``.

>>> reply = await pipeline.handle(HttpRequest("GET", "/inference", "d=hello"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from _codecs import escape_decode
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote

import numpy as np
import orjson

from edge_node.embedders import Embedder, Timing
from edge_node.encode import embeddings_body, inference_body, models_body, shape_vectors
from edge_node.inputs import InputRules
from edge_node.metrics import RequestMetrics
from edge_node.pages import CONTACTS_HTML, INDEX_HTML
from gazsi_cluster.auth import AllowAll, Authorizer, Principal
from gazsi_cluster.errors import (
    GazsiError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyConnections,
    UnknownModel,
)
from gazsi_cluster.http.errors import error_reply
from gazsi_cluster.http.wire import HttpReply, HttpRequest
from gazsi_cluster.llm.protocol import LLM_ROUTES, LlmRequest, decode_llm_request
from gazsi_cluster.protocol import EmbeddingRequest, decode_body

__all__ = ["FORWARDED_HEADER", "EdgePipeline", "Forwarder", "GazsiResult", "LlmRelay", "ModelFacts"]

log = logging.getLogger(__name__)

FORWARDED_HEADER = "x-gazsi-forwarded"
_HTML = "text/html; charset=utf-8"
_OK = b'{"status":"ok"}'


class LlmRelay(Protocol):
    """The node's LLM models (:class:`edge_node.llm.LlmBackends`): chat and completions after authorize."""

    def names(self) -> list[str]: ...

    def serves(self, model: str, path: str) -> bool: ...

    async def relay(self, request: HttpRequest, req: LlmRequest, principal: Principal) -> HttpReply: ...


class Forwarder(Protocol):
    async def forward(self, request: HttpRequest, *, model: str | None) -> HttpReply | None:
        """Send the request to a peer that can take it; None when no peer could."""


@dataclass(frozen=True, slots=True)
class ModelFacts:
    model_id: str
    dimensions: int
    created: int


@dataclass(slots=True)
class GazsiResult:
    """What GAZSI's ``/inference`` computed, before encoding (the GPU data plane writes the answer itself: in
    the feed, or with its build kernel)."""

    text: str
    tokens: int
    sample: np.ndarray  # the first three dimensions
    inference_us: int
    batch_size: int
    headers: list[tuple[str, str]]
    marks: tuple[float, float]  # inference start and end (perf_counter), for the GPU ring's T-stamps

    def reply(self) -> HttpReply:
        """The answer every transport sends: GAZSI's JSON body and the headers the pipeline added."""
        return HttpReply(200, inference_body(self.text, self.tokens, self.sample, self.inference_us,
                                             self.batch_size), self.headers)


def _query_d(query: str) -> str | None:
    """The ``d`` of a query string as Starlette's QueryParams reads it (the last one wins).

    GAZSI's clients send ``d=...`` alone; that case skips ``parse_qsl`` (a third of this route's Python
    outside the tokenizer) and decodes as it would.

    >>> _query_d("d=a+b%21"), _query_d("x=1&d=first&d=last"), _query_d("x=1")
    ('a b!', 'last', None)
    """
    if query.startswith("d=") and "&" not in query:
        value = query[2:]
        if "+" in value:
            value = value.replace("+", " ")
        if "%" in value:
            value = _unquote(value)
        return value
    text = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "d":
            text = value
    return text


def _unquote(value: str) -> str:
    """``unquote(value, errors="replace")``; an ASCII value with well-formed escapes in C (``%XX`` as
    ``\\xXX`` through the escape decoder pickle uses): the stdlib's loop was the largest single cost of an
    ``/inference`` request in a fast-front worker after the tokenizer (issue 13)."""
    if value.isascii():
        try:
            return escape_decode(value.replace("\\", "\\\\").replace("%", "\\x"))[0].decode("utf-8", "replace")
        except ValueError:  # an escape that is not %XX: the stdlib keeps it as it is
            pass
    return unquote(value, errors="replace")


def _check_d(text: str | None) -> str:
    if not text:
        raise InvalidRequest("query parameter d must hold the text to embed", param="d")
    return text


def _known(principal: Principal | None) -> Principal:
    assert principal is not None  # set for every request still live after authorisation
    return principal


def _use_cache(request: HttpRequest) -> bool:
    cache_control = request.headers.get("cache-control")
    return cache_control is None or "no-cache" not in cache_control.lower()


class _Work:
    """One request's state between stages: its timing marks and, once known, the model asked for."""

    __slots__ = ("model", "timing")

    def __init__(self, received: float) -> None:
        self.timing = Timing(received=received)
        self.model: str | None = None


Route = Callable[[HttpRequest, _Work], Awaitable[HttpReply]]


class EdgePipeline:
    """One node's request handling, free of sockets and frameworks (tests call :meth:`handle`).

    ``rules.limits`` and ``max_body_bytes`` may be replaced at run time (Serve ``reconfigure``).
    """

    def __init__(
        self, *, model: ModelFacts, rules: InputRules, embedder: Embedder, authorizer: Authorizer,
        metrics: RequestMetrics, readiness: Callable[[], dict[str, Any]], timing_header: bool = True,
        forwarder: Forwarder | None = None, llm: LlmRelay | None = None,
    ) -> None:
        self.model, self.rules, self.embedder = model, rules, embedder
        self.authorizer, self.metrics, self.readiness = authorizer, metrics, readiness
        self.timing_header = timing_header
        self.forwarder = forwarder
        self.llm = llm
        self.forwarded = 0
        self._routes: dict[str, tuple[str, Route]] = {
            "/v1/embeddings": ("POST", self._embeddings),
            "/inference": ("GET", self._inference),
            "/v1/chat/completions": ("POST", self._llm),
            "/v1/completions": ("POST", self._llm),
            "/v1/models": ("GET", self._models),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/index.": ("GET", self._index),
            "/contacts.": ("GET", self._contacts),
        }

    @property
    def max_body_bytes(self) -> int:
        return self.rules.limits.max_body_bytes

    # -- the one entry point ----------------------------------------------------------------
    async def handle(self, request: HttpRequest) -> HttpReply:
        """Answer ``request``; never raises (cancellation aside: a transport cancels on disconnect)."""
        work = _Work(request.received)
        route = self._routes.get(request.path)
        name = request.path if route is not None else "unmatched"
        try:
            if route is None:
                raise NotFound("Not Found")
            method, run = route
            if request.method != method and not (method == "GET" and request.method == "HEAD"):
                raise MethodNotAllowed("Method Not Allowed")
            if len(request.body) > self.max_body_bytes:
                raise PayloadTooLarge(f"request body exceeds {self.max_body_bytes} bytes")
            reply = await run(request, work)
        except GazsiError as exc:
            reply = await self._refused(request, work, exc)
        except Exception as exc:  # a bug: the log keeps the stack, the client gets a generic 500
            reply = error_reply(exc)
        self.metrics.observe(name, reply.status, time.perf_counter() - request.received)
        return reply

    async def _refused(self, request: HttpRequest, work: _Work, exc: GazsiError) -> HttpReply:
        """A peer may fix overload, a missing model or a node that is not ready: forward those once."""
        # LLM routes are not forwarded: the peer forwarder buffers whole answers, and a stream must not wait.
        if (self.forwarder is not None and FORWARDED_HEADER not in request.headers
                and request.path not in LLM_ROUTES
                and (isinstance(exc, (UnknownModel, ServiceUnavailable))
                     or (isinstance(exc, Overloaded) and not isinstance(exc, TooManyConnections)))):
            try:
                reply = await self.forwarder.forward(request, model=work.model)
            except Exception:
                log.exception("forwarding to a peer failed")
                reply = None
            if reply is not None:
                self.forwarded += 1
                return reply
        return error_reply(exc)

    # -- shared stages -------------------------------------------------------------------
    def _authorize(self, request: HttpRequest, model: str | None) -> Awaitable[Principal]:
        # The authorizer's own awaitable, not a coroutine wrapping it: one frame fewer per request.
        return self.authorizer.authorize(request.headers.get("authorization"), model=model)

    def _check_model(self, model: str) -> None:
        if model != self.model.model_id:
            raise UnknownModel(f"The model `{model}` does not exist on this node.", param="model")

    async def _embed(self, principal: Principal, seqs: list[np.ndarray], work: _Work, request: HttpRequest
                     ) -> tuple[np.ndarray, int, int, int, str | None]:
        """reserve tokens -> embed -> record usage; returns (vectors, tokens, batch, inference_us, cache)."""
        timing = work.timing
        timing.tokenized = time.perf_counter()
        tokens = len(seqs[0]) if len(seqs) == 1 else sum(len(s) for s in seqs)
        model = self.model.model_id
        metered = self._metered
        if metered:
            await self.authorizer.reserve_tokens(principal, model=model, tokens=tokens)
        try:
            done = await self.embedder.embed(seqs, timing, use_cache=_use_cache(request))
        except BaseException as exc:
            self._embed_refused(exc)
            if metered:
                await self._give_back(principal, tokens)
            raise
        # Bill what ran; inputs served from the response cache are counted, not billed.
        billed = tokens if done.computed_tokens is None else done.computed_tokens
        if metered:
            await self._bill(principal, tokens, billed)
        return done.vectors, tokens, done.batch_size, done.inference_us, done.cache

    @property
    def _metered(self) -> bool:
        """Without keys (AllowAll) there is nothing to reserve or bill: two awaits fewer per request."""
        return not isinstance(self.authorizer, AllowAll)

    def _embed_refused(self, exc: BaseException) -> None:
        if isinstance(exc, Overloaded):
            # A full queue answers with the configured Retry-After (limits.retry_after_s, live on
            # reconfigure), whichever embedder refused: this process's batcher or the fast front's ring.
            exc.retry_after = self.rules.limits.retry_after_s

    async def _give_back(self, principal: Principal, tokens: int) -> None:
        """Nothing was served: the reservation goes back and no request is billed (even if cancelled meanwhile)."""
        await asyncio.shield(self.authorizer.record_usage(principal, model=self.model.model_id, tokens=0,
                                                          reserved=tokens, requests=0))

    async def _bill(self, principal: Principal, tokens: int, billed: int) -> None:
        """Settle a served request's reservation of ``tokens``: ``billed`` computed, the rest from the cache."""
        await self.authorizer.record_usage(principal, model=self.model.model_id, tokens=billed, reserved=tokens,
                                           cached_tokens=tokens - billed)

    def _headers(self, request: HttpRequest, principal: Principal, work: _Work, cache: str | None,
                 tokens: int, inputs: int) -> list[tuple[str, str]]:
        timing = work.timing
        timing.serialized = time.perf_counter()
        self.metrics.observe_work(timing, tokens, inputs)
        headers = list(principal.headers)
        if cache is not None:
            headers.append(("X-Gazsi-Cache", cache))
        if self.timing_header and request.headers.get("x-gazsi-timing") == "1":
            headers.append(("Server-Timing", timing.header()))
        return headers

    # -- routes ----------------------------------------------------------------------------
    async def _embeddings(self, request: HttpRequest, work: _Work) -> HttpReply:
        body = decode_body(EmbeddingRequest, request.body)
        work.model = body.model
        principal = await self._authorize(request, body.model)
        self.embedder.check_ready()
        self._check_model(body.model)
        if body.dimensions is not None and not 1 <= body.dimensions <= self.model.dimensions:
            raise InvalidRequest(f"dimensions must be between 1 and {self.model.dimensions}", param="dimensions")
        seqs = await self.rules.tokenize(body.input)
        vectors, tokens, _batch, _us, cache = await self._embed(principal, seqs, work, request)
        out = embeddings_body(shape_vectors(vectors, body.dimensions), model=self.model.model_id,
                              prompt_tokens=tokens, encoding_format=body.encoding_format)
        return HttpReply(200, out, self._headers(request, principal, work, cache, tokens, len(seqs)))

    async def _llm(self, request: HttpRequest, work: _Work) -> HttpReply:
        """decode -> authorize (+ per-key request limits) -> model here? -> the LLM relay (tokens, usage)."""
        req = decode_llm_request(request.path, request.body)
        work.model = req.model
        principal = await self._authorize(request, req.model)
        if self.llm is None or not self.llm.serves(req.model, request.path):
            what = "chat" if request.path == "/v1/chat/completions" else "completions"
            raise UnknownModel(f"The model `{req.model}` does not exist or does not serve {what}.", param="model")
        return await self.llm.relay(request, req, principal)

    async def handle_inference_many(self, requests: Sequence[HttpRequest], texts: Sequence[str | None]
                                    ) -> list[GazsiResult | HttpReply]:
        """``GET /inference`` for many requests at once, for a transport that encodes the bodies itself (the GPU
        data plane, over a burst of heads: :meth:`GazsiResult.reply` in the feed, or its build kernel).

        Per request the same stages, refusals and replies as :meth:`handle` up to, not including, the encode
        stage: a :class:`GazsiResult`, or the reply for an error (through the same forwarding and the same
        error mapping), in ``requests``' order. What the requests can share is done once: one readiness
        check, one tokenizer call, one embed call per cache policy, so the node's engine gets them in one
        ring slot and this process pays one hand-off, not one per request (issue 15: the gpu plane spent
        twice the fast front's CPU per request on one task, tokenizer call and hand-off each). Authorisation,
        per-key limits, token reservations, usage and metrics stay per request. Never raises (cancellation
        aside).
        """
        model = self.model.model_id
        works = [_Work(r.received) for r in requests]
        out: list[GazsiResult | BaseException | None] = [None] * len(requests)
        principals: list[Principal | None] = [None] * len(requests)
        seqs: dict[int, np.ndarray] = {}
        live: list[int] = []
        for i, request in enumerate(requests):
            works[i].model = model
            try:
                _check_d(texts[i])
                principals[i] = await self._authorize(request, model)
            except Exception as exc:
                out[i] = exc
            else:
                live.append(i)
        try:
            if live:
                self.embedder.check_ready()
                tokenized = await self.rules.tokenize_each([texts[i] or "" for i in live])
                now = time.perf_counter()
                for i, got in zip(live, tokenized, strict=True):
                    if isinstance(got, GazsiError):
                        out[i] = got
                    else:
                        seqs[i] = got
                        works[i].timing.tokenized = now
                live = [i for i in live if i in seqs]
        except Exception as exc:
            for i in live:
                out[i] = exc
            live = []
        metered = self._metered
        unsettled: set[int] = set()  # reserved, neither billed nor given back yet
        try:
            if metered and live:
                reserved = []
                for i in live:
                    try:
                        await self.authorizer.reserve_tokens(_known(principals[i]), model=model,
                                                             tokens=len(seqs[i]))
                    except Exception as exc:
                        out[i] = exc
                    else:
                        reserved.append(i)
                        unsettled.add(i)
                live = reserved
            by_policy: dict[bool, list[int]] = {}
            for i in live:
                by_policy.setdefault(_use_cache(requests[i]), []).append(i)
            for use_cache, idx in by_policy.items():
                await self._embed_many(requests, texts, works, principals, seqs, idx, use_cache, out, unsettled)
        finally:
            if metered and unsettled:  # cancelled on the way: nothing was served, the reservations go back
                for i in unsettled:
                    await self._give_back(_known(principals[i]), len(seqs[i]))
        return await self._settle(requests, works, out)

    async def _embed_many(self, requests: Sequence[HttpRequest], texts: Sequence[str | None], works: list[_Work],
                          principals: list[Principal | None], seqs: dict[int, np.ndarray], idx: list[int],
                          use_cache: bool, out: list[GazsiResult | BaseException | None], unsettled: set[int]
                          ) -> None:
        """The embed stage of :meth:`handle_inference_many` for the requests ``idx`` (one cache policy): one
        embed call, then per request its usage (cache hits and inputs another request computed are not billed,
        as :meth:`_embed` bills), headers and result."""
        metered = self._metered
        timing = Timing(received=min(works[i].timing.received for i in idx))
        try:
            done = await self.embedder.embed([seqs[i] for i in idx], timing, use_cache=use_cache)
        except Exception as exc:
            self._embed_refused(exc)
            for i in idx:
                out[i] = exc
                if metered:
                    unsettled.discard(i)
                    await self._give_back(_known(principals[i]), len(seqs[i]))
            return
        for k, i in enumerate(idx):
            request, work, principal = requests[i], works[i], _known(principals[i])
            tokens = len(seqs[i])
            t = work.timing
            t.queued, t.formed, t.infer_start, t.infer_end = timing.queued, timing.formed, timing.infer_start, \
                timing.infer_end
            cache = None if done.hits is None else ("hit" if done.hits[k] else "miss")
            billed = tokens if done.ran is None or done.ran[k] else 0
            if metered:
                unsettled.discard(i)
                await self._bill(principal, tokens, billed)
            headers = self._headers(request, principal, work, cache, tokens, 1)
            out[i] = GazsiResult(texts[i] or "", tokens, done.vectors[k][:3], done.inference_us, done.batch_size, headers,
                                 (timing.infer_start, timing.infer_end))

    async def _settle(self, requests: Sequence[HttpRequest], works: list[_Work],
                      out: list[GazsiResult | BaseException | None]) -> list[GazsiResult | HttpReply]:
        """Errors to replies (forwarded where a peer can help: those concurrently), and every request counted."""
        replies: list[GazsiResult | HttpReply] = []
        refused: list[tuple[int, GazsiError]] = []
        for i, got in enumerate(out):
            if isinstance(got, GazsiResult):
                replies.append(got)
            elif isinstance(got, GazsiError):
                refused.append((i, got))
                replies.append(error_reply(got))
            else:  # a bug: the log keeps the stack, the client gets a generic 500
                replies.append(error_reply(got if isinstance(got, Exception) else RuntimeError("no outcome")))
        if refused and self.forwarder is not None:
            forwarded = await asyncio.gather(*(self._refused(requests[i], works[i], exc) for i, exc in refused))
            for (i, _), answer in zip(refused, forwarded, strict=True):
                replies[i] = answer
        now = time.perf_counter()
        for request, reply in zip(requests, replies, strict=True):
            status = reply.status if isinstance(reply, HttpReply) else 200
            self.metrics.observe("/inference", status, now - request.received)
        return replies

    async def _gazsi(self, request: HttpRequest, work: _Work, text: str | None) -> GazsiResult:
        text = _check_d(text)
        principal = await self._authorize(request, self.model.model_id)
        self.embedder.check_ready()
        seqs = await self.rules.tokenize(text)
        vectors, tokens, batch, infer_us, cache = await self._embed(principal, seqs, work, request)
        headers = self._headers(request, principal, work, cache, tokens, 1)
        return GazsiResult(text, tokens, vectors[0][:3], infer_us, batch, headers,
                           (work.timing.infer_start, work.timing.infer_end))

    async def _inference(self, request: HttpRequest, work: _Work) -> HttpReply:
        text = _query_d(request.query)
        work.model = self.model.model_id
        return (await self._gazsi(request, work, text)).reply()

    async def _models(self, request: HttpRequest, work: _Work) -> HttpReply:
        principal = await self._authorize(request, None)
        names = [self.model.model_id, *(self.llm.names() if self.llm is not None else ())]
        return HttpReply(200, models_body(names, self.model.created), list(principal.headers))

    async def _healthz(self, request: HttpRequest, work: _Work) -> HttpReply:
        return HttpReply(200, _OK)

    async def _readyz(self, request: HttpRequest, work: _Work) -> HttpReply:
        detail = self.readiness()
        return HttpReply(200 if detail.get("ready") else 503, orjson.dumps(detail))

    async def _index(self, request: HttpRequest, work: _Work) -> HttpReply:
        return HttpReply(200, INDEX_HTML, content_type=_HTML)

    async def _contacts(self, request: HttpRequest, work: _Work) -> HttpReply:
        return HttpReply(200, CONTACTS_HTML, content_type=_HTML)
