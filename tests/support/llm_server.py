"""A real OpenAI-compatible LLM server for tests: llama-cpp-python's server over a tiny random-weight GGUF.

:func:`write_tiny_gguf` writes a llama-architecture model (vocab 256, width 64, 2 layers, ~0.5 MB of
random float32 weights) with the ``gguf`` package; :class:`LlamaServer` runs ``python -m llama_cpp.server``
on a loopback port. The text it generates is noise, but every byte of the protocol (SSE chunks, usage,
errors) is the real server's. Without llama-cpp-python the test skips, or fails under
``GAZSI_REQUIRE_SERVICES=1`` (``pip install -e '.[llm-test]'``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from tests.support.required import unavailable

__all__ = ["LlamaServer", "require_llama_cpp", "write_tiny_gguf"]

VOCAB, WIDTH, LAYERS, HEADS, FFN = 256, 64, 2, 4, 128
_PRINTABLE = [chr(c) for c in range(33, 127)]


def require_llama_cpp() -> None:
    for module in ("llama_cpp", "gguf"):
        if importlib.util.find_spec(module) is None:
            unavailable(f"{module} is not installed (pip install -e '.[llm-test]'): no real LLM server to test against")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    # SentencePiece-style: <unk> <s> </s>, a space piece, printable ASCII, then two-letter pieces. No byte
    # tokens, so the noise the random weights generate is always valid UTF-8.
    tokens = ["<unk>", "<s>", "</s>", "\u2581", *_PRINTABLE]
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < VOCAB:
        tokens.append(letters[i // 26 % 26] + letters[i % 26])
        i += 1
    types = [2, 3, 3] + [1] * (VOCAB - 3)  # UNKNOWN, CONTROL, CONTROL, NORMAL...
    scores = [0.0, 0.0, 0.0] + [-float(i) for i in range(VOCAB - 3)]
    return tokens, scores, types


def write_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """Write the tiny random llama model to ``path`` (idempotent per seed); returns ``path``."""
    import gguf

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"gazsi-tiny-{seed}")
    writer.add_context_length(512)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_file_type(0)  # all float32
    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    writer.add_tensor("token_embd.weight", w(VOCAB, WIDTH))
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    writer.add_tensor("output.weight", w(VOCAB, WIDTH))
    for b in range(LAYERS):
        p = f"blk.{b}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(p + name + ".weight", w(WIDTH, WIDTH))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", w(FFN, WIDTH))
        writer.add_tensor(p + "ffn_up.weight", w(FFN, WIDTH))
        writer.add_tensor(p + "ffn_down.weight", w(WIDTH, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1 serving ``model_path`` as ``alias``; ``stop()`` ends it."""

    def __init__(self, model_path: Path, alias: str, *, limit_s: float = 60.0, log: Path | None = None) -> None:
        self.alias, self.port = alias, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._log = out
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "512", "--n_threads", "1",
               "--n_threads_batch", "1", "--verbose", "False"]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + limit_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"llama_cpp.server exited with {self.proc.returncode} (log: {log})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"llama_cpp.server not up after {limit_s}s (log: {log})")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            with contextlib.suppress(Exception):
                self._log.close()  # type: ignore[union-attr]
