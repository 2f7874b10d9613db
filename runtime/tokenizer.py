"""CLIP's byte-level BPE tokenizer without torch (open_clip's SimpleTokenizer imports torch).

Reads the same merges file (bpe_simple_vocab_16e6.txt.gz, copied into the bundle at export) and
produces identical ids for open_clip's default "lower" cleaning. ftfy and regex are used when
installed, as open_clip does; without them, exotic unicode may clean or split differently.
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

try:
    import regex as _re

    _WORDS = r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
except ImportError:  # stdlib re has no \p{..}: approximate letters/numbers with unicode classes
    import re as _re

    _WORDS = r"[^\W\d_]+|\d|(?:[^\s\w]|_)+"

try:
    import ftfy
except ImportError:
    ftfy = None


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map, as in OpenAI CLIP."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class BpeTokenizer:
    def __init__(self, vocab_path: str | Path, context_length: int = 77):
        merges = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        specials = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(specials)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.cache = {t: t for t in specials}
        self.pat = _re.compile("|".join(specials) + r"|'s|'t|'re|'ve|'m|'ll|'d|" + _WORDS, _re.IGNORECASE)
        self.sot_token_id, self.eot_token_id = self.encoder[specials[0]], self.encoder[specials[1]]
        self.context_length = context_length

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in _re.findall(self.pat, _clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """(N, context_length) int64 ids: [SOT] tokens [EOT] 0..., truncated keeping EOT last, as open_clip."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[i, :len(ids)] = ids
        return out
