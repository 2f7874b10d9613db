"""CLIP's text path, opened up so that learned token embeddings can be fed in.

The text transformer is causal: the output at the EOT position depends only on tokens before it.
So running the sequence only up to the longest EOT position gives exactly the same keys as the
full context length, at a fraction of the cost. Every text path in cgil goes through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import CgilError
from .text_blocks import lean_blocks, run_to_eot


@dataclass
class TextTower:
    """The parts of an open_clip text tower, wherever the model keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Module | None
    attn_mask: torch.Tensor | None

    @classmethod
    def of(cls, model: nn.Module) -> "TextTower":
        owner = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        if owner is None or not hasattr(owner, "token_embedding"):
            raise CgilError(
                f"{type(model).__name__} has no open_clip token-embedding text tower "
                "(Hugging Face text towers are not supported for prompt learning)"
            )
        pool = getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        if pool not in ("argmax", "eos"):
            raise CgilError(f"text pooling {pool!r} is not supported: prompt learning needs EOT pooling")
        if getattr(owner, "attn_mask", None) is None:
            raise CgilError("the text tower has no causal mask: truncated prompting would not be exact")
        return cls(
            owner.token_embedding,
            owner.positional_embedding,
            owner.transformer,
            owner.ln_final,
            owner.text_projection,
            owner.attn_mask,
        )

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim


def encode_embeds(tower: TextTower, token_embeds: torch.Tensor, eot: torch.Tensor, lean: bool = True) -> torch.Tensor:
    """The text forward: (N, L, W) token embeddings, already cut to the length to run, read at `eot` (N,).

    positional embedding -> causal transformer -> final LayerNorm -> EOT position -> projection.
    The learner (TextEncoder) and the exported text graphs (export.onnx_export) both run this.
    `lean`: run the transformer through cgil/text_blocks.py where it recognises every block (the same
    numbers, bit for bit, for about a fifth less CPU); False: always the module forward.
    """
    length = token_embeds.shape[1]
    dtype = tower.positional_embedding.dtype
    x = token_embeds.to(dtype) + tower.positional_embedding[:length].to(dtype)
    mask = tower.attn_mask[:length, :length]
    eot = eot.to(x.device)
    blocks = lean_blocks(tower.transformer, x, mask) if lean else None
    if blocks is not None:
        x = tower.ln_final(run_to_eot(blocks, x, mask, eot, tower.transformer.batch_first))
    else:
        x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Module) else x @ proj
    return x.float()


class TextEncoder(nn.Module):
    """Token embeddings -> CLIP text embedding, truncated after the last EOT of the batch."""

    def __init__(self, model: nn.Module, tokenizer, truncate: bool = True):
        super().__init__()
        self.tower = TextTower.of(model)
        self.tokenizer = tokenizer
        self.truncate = truncate
        self.lean = True  # encode_embeds' lean transformer path (bit-exact); False: the module forward
        eot = getattr(tokenizer, "eot_token_id", None)
        self.eot_id = int(eot) if eot is not None else None

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eot_id is not None:
            return (tokens == self.eot_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # CLIP's BPE: EOT has the largest id

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.token_embedding(tokens.to(self.tower.positional_embedding.device))

    def forward(self, token_embeds: torch.Tensor, eot: torch.Tensor, longest_eot: Optional[int] = None) -> torch.Tensor:
        """Unnormalised text embeddings from (N, L, W) token embeddings and EOT positions (N,).

        `longest_eot`: max(eot) when the caller knows it; reading it from a GPU tensor would stall
        the host on every training step until the GPU has caught up.
        """
        if self.truncate:
            length = (int(eot.max()) if longest_eot is None else longest_eot) + 1
        else:
            length = token_embeds.shape[1]
        return encode_embeds(self.tower, token_embeds[:, :length], eot, self.lean)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(self.embed_tokens(tokens), self.eot_positions(tokens))

    @torch.no_grad()
    def zero_shot(self, names: Sequence[str], template: str = "a photo of a {}") -> torch.Tensor:
        """z_c of the spec: the unnormalised text embedding of the template filled with each name."""
        if not names:
            return torch.zeros(0, 0)
        return self.encode_tokens(self.tokenize([template.format(n) for n in names]))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
