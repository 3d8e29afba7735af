"""The ASCII way to the ids (``_AsciiBert``) gives exactly the library's ids, and leaves it everything else."""

from __future__ import annotations

import random
import string

import pytest
from tokenizers import Tokenizer

from edge_node.tokenization import TextTokenizer, _AsciiBert
from gazsi_cluster.model import load_model_spec

pytestmark = pytest.mark.unit

WORDS = ["hello", "World", "the", "QUICK", "brown", "fox's", "don't", "e-mail", "x_y", "a.b", "3.14", "C++", "#tag",
         "@user", "unbelievable", "tokenization", "supercalifragilisticexpialidocious", "a" * 150, "GPU-to-CPU",
         "\t", "\n", "  ", "~`!$%^&*()", "{}|;:'\",<.>/?"]
ODD = ["naïve", "[MASK]", "[cls]", "x[y", "ß", "\x0b", "\x7f"]  # the library's to decide


@pytest.fixture(scope="module")
def library() -> Tokenizer:
    spec = load_model_spec("all-MiniLM-L6-v2")
    tok = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=64)
    return tok


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 120))) for _ in range(3000)]
    out += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 90))) for _ in range(3000)]
    out += [" ".join(rng.choice(WORDS + ODD) for _ in range(rng.randint(1, 20))) for _ in range(1000)]
    return out


def test_the_ascii_way_gives_the_library_s_ids(library: Tokenizer) -> None:
    spec = load_model_spec("all-MiniLM-L6-v2")
    tok = TextTokenizer(spec.path, 64)
    assert tok._ascii is not None  # this model's tokenizer.json is an uncased BERT one
    texts = _texts(15)
    taken = sum(tok._ascii.encode(t) is not None for t in texts)
    assert 3000 <= taken < len(texts)  # both ways were exercised, long texts truncated (64 here)
    assert [ids.tolist() for ids in tok.encode_each(texts)] == [e.ids for e in library.encode_batch(texts)]
    assert [ids.tolist() for ids in tok.encode(texts[:50])] == [e.ids for e in library.encode_batch(texts[:50])]
    assert [tok.encode([t])[0].tolist() for t in texts[3000:3100]] == [library.encode(t).ids for t in texts[3000:3100]]


def test_text_the_library_must_decide_is_left_to_it() -> None:
    spec = load_model_spec("all-MiniLM-L6-v2")
    fast = TextTokenizer(spec.path, 64)._ascii
    assert fast is not None
    for text in ("naïve", "[MASK] x", "tab\x0bvt", "del\x7f", "日本"):
        assert fast.encode(text) is None, text
    assert fast.encode("Hello, world!") is not None


def test_only_an_uncased_bert_tokenizer_takes_the_ascii_way(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    spec = load_model_spec("all-MiniLM-L6-v2")
    raw = json.loads((spec.path / "tokenizer.json").read_text())
    raw["normalizer"]["lowercase"] = False  # a cased model: lower-casing would change its ids
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(raw))
    tok = Tokenizer.from_file(str(path))
    assert _AsciiBert.for_tokenizer(tok, path, 101, 102, 64) is None
    assert _AsciiBert.for_tokenizer(tok, spec.path / "tokenizer.json", 101, 102, 64) is not None
