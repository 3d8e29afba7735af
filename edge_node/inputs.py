"""The validate stage: OpenAI's ``input`` union checked against the node's limits, then tokenised."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from edge_node.tokenization import TextTokenizer
from gazsi_cluster.config import LimitsConfig
from gazsi_cluster.errors import GazsiError, InputTooLong, InvalidRequest, TooManyInputs

__all__ = ["InputRules", "normalise_input"]

# Above this many texts, tokenising moves off the event loop (Rust releases the GIL).
_TOKENIZE_INLINE_MAX = 32


def normalise_input(raw: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """Split OpenAI's ``input`` union into texts or token-id lists (exactly one is not None)."""
    if isinstance(raw, str):
        return [raw], None
    if isinstance(raw, list):
        if not raw:
            raise InvalidRequest("input must not be an empty list", param="input")
        if all(isinstance(x, str) for x in raw):
            return list(raw), None
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            return None, [list(raw)]
        if all(isinstance(x, list) for x in raw):
            return None, [list(x) for x in raw]
    raise InvalidRequest(
        "input must be a string, a list of strings, a list of token ids or a list of token-id lists",
        param="input",
    )


class InputRules:
    """Checks inputs against ``limits`` and tokenises them. ``limits`` may be replaced at run time."""

    def __init__(self, tokenizer: TextTokenizer, limits: LimitsConfig) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    def _check_count(self, n: int) -> None:
        if n > self.limits.max_inputs_per_request:
            raise TooManyInputs(
                f"at most {self.limits.max_inputs_per_request} inputs per request, got {n}", param="input"
            )

    def check_texts(self, texts: list[str]) -> None:
        self._check_count(len(texts))
        limit = self.limits.max_input_chars
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"input[{i}] is an empty string", param="input")
            if len(text) > limit:
                raise InputTooLong(
                    f"input[{i}] has {len(text)} characters; the limit is {limit} "
                    "(texts are truncated to the model's token limit, but not beyond this size)",
                    param="input",
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequest(f"input[{i}] is not valid Unicode text", param="input") from exc

    async def tokenize(self, raw: Any) -> list[np.ndarray]:
        """``input`` as int64 id arrays with [CLS] … [SEP], truncated to the model's length."""
        texts, ids = normalise_input(raw)
        if texts is not None:
            self.check_texts(texts)
            if len(texts) <= _TOKENIZE_INLINE_MAX:
                return self.tokenizer.encode(texts)
            return await asyncio.to_thread(self.tokenizer.encode, texts)
        assert ids is not None
        self._check_count(len(ids))
        return self.tokenizer.wrap_ids(ids)

    async def tokenize_each(self, texts: list[str]) -> list[np.ndarray | GazsiError]:
        """Per text, what ``tokenize(text)`` gives: its one id array, or the refusal it raises.

        For a transport that serves many single-text requests at once (the GPU data plane's bursts): one
        tokenizer call for all of them (:meth:`TextTokenizer.encode_each`) instead of one per request, and
        each request still gets its own refusal.
        """
        out: list[np.ndarray | GazsiError] = []
        good: list[int] = []
        for i, text in enumerate(texts):
            try:
                self.check_texts([text])
            except GazsiError as exc:
                out.append(exc)
                continue
            out.append(_EMPTY)
            good.append(i)
        if good:
            batch = [texts[i] for i in good]
            if len(batch) <= _TOKENIZE_INLINE_MAX:
                ids = self.tokenizer.encode_each(batch)
            else:
                ids = await asyncio.to_thread(self.tokenizer.encode_each, batch)
            for i, seq in zip(good, ids, strict=True):
                out[i] = seq
        return out


_EMPTY = np.zeros(0, dtype=np.int64)

