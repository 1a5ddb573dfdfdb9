"""Tokenizers: a self-contained default and a hook for users' own.

A tokenizer here is any callable ``tokenizer(texts) -> LongTensor (B, L)``
that starts each row with a start token, ends the text with an end-of-text
token whose id is the largest in the row (the text tower pools there,
``pool="argmax"``), and pads with 0, as open_clip's tokenizers do. It may
carry ``vocab_size`` and ``context_length`` attributes; the trainer checks
the ids it produces against the model's vocabulary.

- :class:`HashTokenizer` (the default, ``"hash"``): lower-cased words and
  punctuation, each mapped to a bucket by a stable hash (CRC-32), so it needs
  no vocabulary file and no download. Distinct words rarely share a bucket
  (about (words^2 / 2) / vocab_size collisions); enough for training from
  scratch, not for loading pretrained weights.
- ``"clip-bpe"``: CLIP's byte-pair encoding, from the vocabulary file that
  the open_clip package ships (no download; needs ``open_clip_torch``). Use
  it with pretrained CLIP weights.
- ``"hf:NAME_OR_PATH"``: a transformers tokenizer (a local folder works
  offline; a hub name downloads).
- ``"module.path:attr"``: your own: ``attr`` is a tokenizer as above, or a
  class, instantiated with no arguments.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
import zlib
from typing import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_TOKENIZER = "hash"
PAD_ID = 0

_WORDS = re.compile(r"[^\W_]+|[^\w\s]", re.UNICODE)


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts: expected str items, got {type(t).__name__}")
    return texts


def _pack(rows: list[list[int]], sot: int, eot: int, context_length: int) -> Tensor:
    """[sot, *ids, eot] per row, truncated so that eot always survives, padded with 0."""
    if context_length < 2:
        raise ValueError(f"context_length: expected at least 2 (start and end tokens), got {context_length}")
    out = torch.full((len(rows), context_length), PAD_ID, dtype=torch.long)
    for i, ids in enumerate(rows):
        ids = [sot, *ids[: context_length - 2], eot]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class HashTokenizer:
    """Words to hash buckets: no vocabulary file, no download.

    Ids: 0 pad, 1 .. vocab_size - 3 words, vocab_size - 2 start of text,
    vocab_size - 1 end of text (the largest, where the text tower pools).
    Text is NFKC-normalized and lower-cased; a word is a run of letters and
    digits, and each other non-space character is a token of its own.
    """

    def __init__(self, vocab_size: int = 49408, context_length: int = 77):
        if vocab_size < 4:
            raise ValueError(f"vocab_size: expected at least 4, got {vocab_size}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.sot_token_id = vocab_size - 2
        self.eot_token_id = vocab_size - 1

    def words(self, text: str) -> list[str]:
        return _WORDS.findall(unicodedata.normalize("NFKC", text).lower())

    def word_id(self, word: str) -> int:
        return 1 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 3)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        rows = [[self.word_id(w) for w in self.words(t)] for t in _as_list(texts)]
        return _pack(rows, self.sot_token_id, self.eot_token_id, context_length or self.context_length)


class _OpenClipBPE:
    """CLIP's BPE via open_clip's SimpleTokenizer (its vocabulary ships in the package)."""

    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self._tok = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._tok.encoder)
        self.context_length = context_length

    def __call__(self, texts, context_length: int | None = None) -> Tensor:
        return self._tok(_as_list(texts), context_length=context_length or self.context_length)


class _HFTokenizer:
    """A transformers tokenizer, padded / truncated to the context length."""

    def __init__(self, name: str, context_length: int):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(name)
        self.vocab_size = len(self._tok)
        self.context_length = context_length

    def __call__(self, texts, context_length: int | None = None) -> Tensor:
        length = context_length or self.context_length
        return self._tok(_as_list(texts), padding="max_length", truncation=True, max_length=length,
                         return_tensors="pt")["input_ids"].long()


def get_tokenizer(spec: str | Callable = DEFAULT_TOKENIZER, *, vocab_size: int = 49408,
                  context_length: int = 77) -> Callable:
    """A tokenizer from a spec string (see the module docstring) or a callable (returned as is).

    ``vocab_size`` and ``context_length`` size the default hash tokenizer
    (pass the model's); the others have their own vocabulary.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer: expected a spec string or a callable, got {type(spec).__name__}")
    if spec == "hash":
        return HashTokenizer(vocab_size=vocab_size, context_length=context_length)
    if spec == "clip-bpe":
        try:
            return _OpenClipBPE(context_length)
        except ImportError as exc:
            raise ValueError("tokenizer 'clip-bpe' needs the package open_clip_torch "
                             "(pip install open_clip_torch)") from exc
    if spec.startswith("hf:"):
        return _HFTokenizer(spec[3:], context_length)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"tokenizer {spec!r}: cannot import {attr!r} from {module_name!r}: {exc}") from exc
        return obj() if isinstance(obj, type) else obj
    raise ValueError(f"tokenizer: unknown spec {spec!r}; expected 'hash', 'clip-bpe', 'hf:NAME_OR_PATH' "
                     "or 'module.path:attr'")
