"""The bundle's text graphs on ONNX Runtime: class names (or learned prompts) -> keys, without torch."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import ort_session
from .bundle import BundleManifest, inside
from .errors import CgilError
from .format import CONTEXT, TOKENS
from .tokenizer import BpeTokenizer


def truncate(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """Keep up to the batch's last EOT: the causal text transformer makes this exact (see cgil.text)."""
    return tokens[:, : int((tokens == eot_id).argmax(-1).max()) + 1]


class TextEncoderRuntime:
    def __init__(self, bundle: Path, manifest: BundleManifest):
        text = manifest.text
        if not text:
            raise CgilError(f"{bundle} has no text graphs (exported without a CLIP BPE tokenizer)")
        self.template = text["template"]
        tok = text["tokenizer"]
        self.tokenizer = BpeTokenizer(inside(bundle, tok["vocab"], "tokenizer vocabulary"), tok["context_length"])
        self.eot_id = self.tokenizer.eot_token_id
        self.zero_shot_session = ort_session(inside(bundle, text["zero_shot"], "text graph"))
        self.prompted_session = ort_session(inside(bundle, text["prompted"], "text graph"))

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        return truncate(self.tokenizer(list(texts)), self.eot_id)

    def zero_shot(self, names: Sequence[str]) -> np.ndarray:
        """Unnormalised z_c of "a photo of a {name}" for each name, (N, D)."""
        if not names:
            raise CgilError("no class names given")
        tokens = self.tokens([self.template.format(n) for n in names])
        return self.zero_shot_session.run(None, {TOKENS: tokens})[0]

    def prompted_keys(self, context: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Keys from learned context vectors (C, n_ctx + 1, W) and prompt tokens (C, L)."""
        tokens = truncate(tokens, self.eot_id)
        return self.prompted_session.run(None, {CONTEXT: context.astype(np.float32), TOKENS: tokens})[0]
