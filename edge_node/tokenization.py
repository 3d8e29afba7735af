"""Tokenisation with the model's own ``tokenizer.json`` through the Rust ``tokenizers`` library.

Inputs are truncated to the model's maximum length (256 for all-MiniLM-L6-v2, as
sentence-transformers does); ``usage`` reports the tokens actually used, after truncation.

Printable-ASCII text on an uncased BERT tokenizer takes a shorter way to the same ids
(:class:`_AsciiBert`): lower-case, split into runs of letters and digits and single punctuation marks
(what ``BertNormalizer`` and ``BertPreTokenizer`` do to such text), each word's pieces from the library's
own WordPiece model, remembered per word. 3.4 µs against 22 for a 10-word sentence on the 2-core machine:
the library's Python binding builds offsets, normalised-string alignments and an ``Encoding`` per text,
and tokenizing was a third of a GPU-plane feed's own CPU (issue 15). Everything else (any other byte,
a ``[`` that could open a special token) goes through the library as before; a unit test holds the two
equal over random text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gazsi_cluster.errors import InvalidRequest

__all__ = ["TextTokenizer"]


class TextTokenizer:
    """Turns texts (or caller-supplied token ids) into int64 id arrays with [CLS] … [SEP]."""

    def __init__(self, model_dir: Path, max_seq_len: int) -> None:
        self._tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_seq_len)
        self.max_seq_len = max_seq_len
        self.vocab_size = self._tok.get_vocab_size()
        cls_id = self._tok.token_to_id("[CLS]")
        sep_id = self._tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise InvalidRequest("tokenizer lacks [CLS]/[SEP]")
        self.cls_id, self.sep_id = int(cls_id), int(sep_id)
        self._ascii = _AsciiBert.for_tokenizer(self._tok, Path(model_dir) / "tokenizer.json", self.cls_id,
                                               self.sep_id, max_seq_len)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode texts; one int64 array per text. What the ASCII way cannot take goes through the library
        (several texts through Rust's parallel batch encoder)."""
        return self._encode(texts, parallel=True)

    def encode_each(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` for many one-text requests at once (the GPU plane's bursts, tokenised on the feed's
        own thread): what the library encodes goes through its batch encoder that skips character offsets,
        which nothing here reads."""
        return self._encode(texts, parallel=False)

    def _encode(self, texts: Sequence[str], *, parallel: bool) -> list[np.ndarray]:
        fast = self._ascii
        out: list[np.ndarray | None] = [fast.encode(t) for t in texts] if fast is not None else [None] * len(texts)
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            todo = [texts[i] for i in rest]
            if len(todo) == 1:
                encodings = [self._tok.encode(todo[0])]
            elif parallel:
                encodings = self._tok.encode_batch(todo)
            else:
                batch_fast = getattr(self._tok, "encode_batch_fast", None)  # tokenizers >= 0.21
                encodings = batch_fast(todo) if batch_fast is not None else self._tok.encode_batch(todo)
            for i, e in zip(rest, encodings, strict=True):
                out[i] = np.asarray(e.ids, dtype=np.int64)
        return out  # type: ignore[return-value]  # every None was filled

    def wrap_ids(self, sequences: Sequence[Sequence[int]], param: str = "input") -> list[np.ndarray]:
        """Accept pre-tokenised input (ids of this model's vocabulary, without special tokens).

        Each sequence is truncated to leave room for [CLS] and [SEP], which are added here.
        """
        out = []
        room = self.max_seq_len - 2
        for i, seq in enumerate(sequences):
            arr = np.asarray(seq, dtype=np.int64)
            if arr.size == 0:
                raise InvalidRequest(f"{param}[{i}] is an empty token list", param=param)
            if int(arr.max()) >= self.vocab_size:
                raise InvalidRequest(
                    f"{param}[{i}] holds a token id outside the vocabulary (size {self.vocab_size})",
                    param=param,
                )
            body = arr[:room]
            out.append(np.concatenate(([self.cls_id], body, [self.sep_id])).astype(np.int64))
        return out


class _AsciiBert:
    """The ids an uncased BERT ``tokenizer.json`` gives printable-ASCII text, without the library's per-text
    objects (see the module's docstring); :meth:`for_tokenizer` returns None for any other tokenizer."""

    # Any byte but printable ASCII and \t \n \r (accents, control characters, other scripts), and "[",
    # which could open one of the special tokens the library matches in raw text: the library's way.
    _OTHER = re.compile(r"[^\x20-\x5a\x5c-\x7e\t\n\r]")
    # BertPreTokenizer on lower-cased ASCII: runs of letters and digits, and each punctuation mark alone.
    _WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
    _MAX_WORDS = 65_536  # words remembered; past it the memory starts over (clients choose the words)
    _MAX_WORD = 64  # longer words are not remembered

    def __init__(self, tok: Tokenizer, cls_id: int, sep_id: int, max_seq_len: int) -> None:
        self._model = tok.model
        self._cls, self._sep, self._max = cls_id, sep_id, max_seq_len
        self._pieces: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer, path: Path, cls_id: int, sep_id: int, max_seq_len: int
                      ) -> _AsciiBert | None:
        try:
            spec: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        norm, pre, model, post = (spec.get(k) or {} for k in ("normalizer", "pre_tokenizer", "model", "post_processor"))
        single = [next(iter(part.values())).get("id") for part in post.get("single", [])]
        if (norm.get("type") == "BertNormalizer" and norm.get("lowercase") is True and norm.get("clean_text") is True
                and norm.get("strip_accents") in (None, True) and pre.get("type") == "BertPreTokenizer"
                and model.get("type") == "WordPiece" and post.get("type") == "TemplateProcessing"
                and single == ["[CLS]", "A", "[SEP]"]
                and all(str(t.get("content", "")).startswith("[") for t in spec.get("added_tokens", []))):
            return cls(tok, cls_id, sep_id, max_seq_len)
        return None

    def encode(self, text: str) -> np.ndarray | None:
        """The ids (with [CLS] and [SEP], truncated), or None where the library must decide."""
        if self._OTHER.search(text) is not None:
            return None
        pieces = self._pieces
        ids = [self._cls]
        for word in self._WORDS.findall(text.lower()):
            got = pieces.get(word)
            if got is None:
                got = [t.id for t in self._model.tokenize(word)]
                if len(word) <= self._MAX_WORD:
                    if len(pieces) >= self._MAX_WORDS:
                        pieces.clear()
                    pieces[word] = got
            ids += got
            if len(ids) >= self._max:
                break
        del ids[self._max - 1:]
        ids.append(self._sep)
        return np.array(ids, dtype=np.int64)

