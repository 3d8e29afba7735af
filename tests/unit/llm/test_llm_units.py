"""The LLM relay's pieces without a server: SSE splitting, the usage tap, request bounds, config, CLI."""

from __future__ import annotations

import argparse

import orjson
import pytest

from gazsi_cluster.config import load_settings
from gazsi_cluster.errors import ConfigError, InvalidRequest, UpstreamError, UpstreamTimeout
from gazsi_cluster.llm import SseSplitter, UsageTap, decode_llm_request, error_event

pytestmark = pytest.mark.unit


def _ev(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def test_splitter_gives_whole_events_whatever_the_chunking() -> None:
    stream = _ev({"a": 1}) + b": comment\n\n" + _ev({"b": 2}) + b"data: [DONE]\n\n"
    for size in (1, 2, 3, 7, 64, len(stream)):
        s = SseSplitter()
        out: list[bytes] = []
        for i in range(0, len(stream), size):
            out += s.feed(stream[i:i + size])
        assert [e.rstrip(b"\n") for e in out] == [b'data: {"a":1}', b": comment", b'data: {"b":2}', b"data: [DONE]"]
        assert s.rest() == b""


def test_splitter_bounds_an_event_that_never_ends() -> None:
    s = SseSplitter(max_event_bytes=1024)
    with pytest.raises(UpstreamError):
        s.feed(b"data: " + b"x" * 2000)


def test_usage_tap_counts_and_withholds_the_usage_chunk_it_asked_for() -> None:
    tap = UsageTap(drop_usage_chunk=True)
    assert tap.event(_ev({"choices": [{"delta": {"role": "assistant"}}]}))
    assert tap.event(_ev({"choices": [{"delta": {"content": "hi"}}]}))
    assert tap.event(_ev({"choices": [{"delta": {"content": ""}}]}))
    assert not tap.event(_ev({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}))
    assert tap.event(b"data: [DONE]\n\n")
    assert (tap.content_chunks, tap.prompt_tokens, tap.completion_tokens, tap.done) == (2, 5, 2, True)
    shown = UsageTap(drop_usage_chunk=False)
    assert shown.event(_ev({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}))
    whole = UsageTap()
    whole.body(orjson.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}))
    assert (whole.prompt_tokens, whole.completion_tokens) == (7, 3)


def test_error_event_is_the_one_error_body() -> None:
    ev = error_event(UpstreamTimeout("silence"))
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n")
    assert orjson.loads(ev[6:])["error"] == {"message": "silence", "type": "timeout_error", "param": None,
                                             "code": "upstream_timeout"}


def test_request_bounds() -> None:
    ok = decode_llm_request("/v1/chat/completions",
                            b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5,"n":2,"top_k":3}')
    assert ok.token_cap == 10 and ok.model_extra == {"top_k": 3}
    assert decode_llm_request("/v1/completions", b'{"model":"m","prompt":[1,2,3]}').token_cap is None
    for bad, param in [(b'{"model":"m","messages":[]}', "messages"), (b'{"model":"m","prompt":5}', "prompt"),
                       (b'{"model":"m","messages":[{"role":"user"}],"max_tokens":-1}', "max_tokens")]:
        path = "/v1/completions" if b"prompt" in bad else "/v1/chat/completions"
        with pytest.raises(InvalidRequest) as info:
            decode_llm_request(path, bad)
        assert info.value.param == param


def test_edge_models_config() -> None:
    s = load_settings(edge={"models": [{"name": "llama", "url": "http://127.0.0.1:8081/v1"}]})
    assert s.edge.models[0].kind == "chat" and s.llm.first_byte_timeout_s == 30.0
    with pytest.raises(ConfigError):
        load_settings(edge={"models": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]})
    with pytest.raises(ConfigError):
        load_settings(edge={"models": [{"name": "a", "url": "ftp://x"}]})


def test_cli_llm_flag_becomes_edge_models() -> None:
    from gazsi_cli.edge import _overrides
    from gazsi_cli.main import build_parser

    # The real parser: the namespace has every flag `gazsi edge serve` has, today's and tomorrow's.
    ns = build_parser().parse_args(["edge", "serve", "--llm", "llama=http://127.0.0.1:8081",
                                    "--llm", "qwen=http://h:1/v1"])
    models = _overrides(ns)["edge"]["models"]
    assert models == [{"name": "llama", "kind": "chat", "url": "http://127.0.0.1:8081"},
                      {"name": "qwen", "kind": "chat", "url": "http://h:1/v1"}]
    with pytest.raises(SystemExit):
        _overrides(argparse.Namespace(**{**vars(ns), "llm": ["no-equals-sign"]}))


def test_a_fast_or_gpu_data_plane_refuses_llm_models(tmp_path) -> None:
    from edge_node.engines.fake import FakeEngine
    from edge_node.node import EdgeNode

    models = [{"name": "llama", "url": "http://127.0.0.1:9"}]
    s = load_settings(data_dir=str(tmp_path), auth={"enabled": False},
                      edge={"dataplane": "fast", "models": models}, engine={"backend": "fake"})
    with pytest.raises(ConfigError, match="asgi"):
        EdgeNode(s, engine=FakeEngine())
    auto = load_settings(data_dir=str(tmp_path), auth={"enabled": False},
                         edge={"dataplane": "auto", "models": models}, engine={"backend": "fake"})
    node = EdgeNode(auto, engine=FakeEngine())
    assert node.dataplane == "asgi" and node.llm.names() == ["llama"]


def test_prefix_affinity_sends_a_shared_prompt_prefix_to_one_edge() -> None:
    from gazsi_cluster.config import LlmConfig
    from gazsi_cluster.llm import LlmRouter
    from gazsi_cluster.routing import NodeEntry, RoutingClient, RoutingTable, make_policy

    nodes = tuple(NodeEntry(f"n{i}", f"http://n{i}", models=("m",)) for i in range(4))
    table = RoutingTable(1, 1, nodes)
    routing = RoutingClient(lambda: table, make_policy("p2c"), attempts=3)
    router = LlmRouter(routing, lambda: table, LlmConfig(prefix_affinity_chars=32), attempts=3, keep_headers=())

    def chat(system: str, user: str) -> bytes:
        return orjson.dumps({"model": "m", "messages": [{"role": "system", "content": system},
                                                        {"role": "user", "content": user}]})

    from gazsi_cluster.routing import RouteRequest

    def pick(body: bytes, attempt: int = 0) -> str:
        req = decode_llm_request("/v1/chat/completions", body)
        return router._pick(RouteRequest("m", router._prefix(req)), attempt).node_id

    same = {pick(chat("You are a long shared system prompt", f"question {i}")) for i in range(20)}
    assert len(same) == 1
    spread = {pick(chat(f"system prompt number {i} differs early", "q")) for i in range(40)}
    assert len(spread) > 1
    # A node in quarantine is skipped; a retry (attempt > 0) is the policy's choice.
    sticky = same.pop()
    routing.report_failure(table.by_id[sticky], "test")
    assert pick(chat("You are a long shared system prompt", "again")) != sticky
    off = LlmRouter(routing, lambda: table, LlmConfig(), attempts=3, keep_headers=())
    assert off._prefix(decode_llm_request("/v1/chat/completions", chat("a", "b"))) is None


def test_llm_streams_in_flight_count_as_node_load(tmp_path) -> None:
    from edge_node.engines.fake import FakeEngine
    from edge_node.node import EdgeNode

    s = load_settings(data_dir=str(tmp_path), auth={"enabled": False}, engine={"backend": "fake"},
                      edge={"dataplane": "asgi", "models": [{"name": "llama", "url": "http://127.0.0.1:9"}]})
    node = EdgeNode(s, engine=FakeEngine())
    base = node.load().in_flight
    node.llm.in_flight = 3
    assert node.load().in_flight == base + 3


def test_llm_package_surface_is_pinned() -> None:
    import gazsi_cluster.llm as llm

    assert set(llm.__all__) == {
        "LLM_ROUTES", "ChatRequest", "CompletionRequest", "LlmMetrics", "LlmRouter", "SseSplitter", "Upstream",
        "UsageTap", "decode_llm_request", "error_event", "open_upstream", "upstream_client",
    }
    assert all(hasattr(llm, name) for name in llm.__all__)


def test_an_upstream_embedding_model_is_refused_until_it_is_relayed() -> None:
    with pytest.raises(ConfigError, match="not supported yet"):
        load_settings(edge={"models": [{"name": "e5", "kind": "embedding", "url": "http://127.0.0.1:9"}]})


class _StubUpstream:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks, self.closed = chunks, 0

    async def chunks(self, chunk_timeout_s: float):  # type: ignore[no-untyped-def]
        for c in self._chunks:
            yield c

    async def aclose(self) -> None:
        self.closed += 1


async def test_a_stream_dropped_before_its_first_chunk_still_ends_once() -> None:
    from gazsi_cluster.llm.stream import relay_events

    ends: list[str] = []

    async def on_end(outcome: str) -> None:
        ends.append(outcome)

    up = _StubUpstream([_ev({"choices": [{"delta": {"content": "a"}}]}), b"data: [DONE]\n\n"])
    dropped = relay_events(up, UsageTap(), chunk_timeout_s=1, on_end=on_end)  # type: ignore[arg-type]
    await dropped.aclose()  # never iterated: the transport gave up on it
    assert ends == ["disconnect"] and up.closed >= 1
    ends.clear()
    up = _StubUpstream([_ev({"choices": [{"delta": {"content": "a"}}]}), b"data: [DONE]\n\n"])
    stream = relay_events(up, UsageTap(), chunk_timeout_s=1, on_end=on_end)  # type: ignore[arg-type]
    got = [c async for c in stream]
    await stream.aclose()
    assert got[-1].endswith(b"[DONE]\n\n") and ends == ["ok"]
    ends.clear()
    up = _StubUpstream([_ev({"choices": [{"delta": {"content": "a"}}]})])  # no [DONE]: broke off
    got = [c async for c in relay_events(up, UsageTap(), chunk_timeout_s=1, on_end=on_end)]  # type: ignore[arg-type]
    assert b'"code":"upstream_error"' in got[-1] and ends == ["upstream_error"]
