"""Class-specific text prompts: the trainable part of CGIL.

For class c the text transformer sees  [SOS] p_c,1..p_c,n  g(z_c)  name_c . [EOS]
where p_c are learned token embeddings and g is a shared MLP ("context generator") applied to
the frozen zero-shot text embedding z_c of "a photo of a {name_c}". The class key is the
L2-normalised text embedding of that sequence; the matrix of keys is the classifier head.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from runtime.errors import CgilError
from .text import TextEncoder, normalize

PLACEHOLDER = "X"  # a real BPE token whose embedding is overwritten by learned vectors


class ContextGenerator(nn.Sequential):
    """g: (Linear -> BatchNorm -> SELU) x 3 -> Linear, from text-embedding width E to token width W.

    Widths as in the reference: the first two blocks map E -> E, the third E -> W (BatchNorm(W)), and
    the last layer W -> W. When E = W (cgil-tiny, ViT-B-16, ViT-L-14) every layer is E -> E.

    As in the reference, it always runs in evaluation mode: the BatchNorm layers keep their
    initial running statistics and act as learnable affine maps, and a class's key does not
    depend on which other classes share its batch.
    """

    def __init__(self, embed_dim: int, token_width: int, depth: int = 3):
        layers: list[nn.Module] = []
        width = embed_dim
        for block in range(depth):
            out = token_width if block == depth - 1 else embed_dim
            layers += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.SELU()]
            width = out
        layers.append(nn.Linear(width, token_width))
        super().__init__(*layers)
        self.eval()

    def train(self, mode: bool = True) -> "ContextGenerator":
        return super().train(False)


class PromptLearner(nn.Module):
    """Holds the prompts of every class seen so far, in arrival order (the head's column order)."""

    def __init__(self, text: TextEncoder, embed_dim: int, n_ctx: int = 1):
        super().__init__()
        self.text = text
        self.n_ctx = n_ctx
        width = text.tower.width
        self.generator = ContextGenerator(embed_dim, width)
        self.ctx = nn.Parameter(torch.zeros(0, n_ctx, width))
        self.class_ids: list[int] = []
        self.class_names: list[str] = []
        self.eot_on_host: list[int] = []
        self.register_buffer("tokens", torch.zeros(0, text.tower.positional_embedding.shape[0], dtype=torch.long))
        self.register_buffer("zero_shot", torch.zeros(0, embed_dim))  # z_c, unnormalised
        self._frozen = None  # (key, token embeddings, EOT positions) of `tokens`: see frozen_embeddings

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def prompt_text(self, name: str) -> str:
        return " ".join([PLACEHOLDER] * (self.n_ctx + 1)) + f" {name}."

    def add_classes(self, class_ids: Sequence[int], names: Sequence[str], generator: torch.Generator,
                    zero_shot: torch.Tensor | None = None) -> None:
        """Append new classes: context vectors ~ N(0, 0.02), tokens and zero-shot embeddings cached.

        `zero_shot` restores saved z_c exactly: recomputing them in a batch of another length
        would change their last bits, and a resumed run must continue bit for bit.
        """
        dev = self.ctx.device
        new_ctx = torch.randn(len(class_ids), self.n_ctx, self.ctx.shape[-1], generator=generator) * 0.02
        tokens = self.text.tokenize([self.prompt_text(n) for n in names])
        # EOT positions kept on the host: keys() truncates the text path to the longest one, and
        # reading it from device tokens would sync the host with the GPU on every alignment step.
        self.eot_on_host += self.text.eot_positions(tokens).tolist()
        tokens = tokens.to(dev)
        z = (self.text.zero_shot(names) if zero_shot is None else zero_shot).to(dev)
        self.ctx = nn.Parameter(torch.cat([self.ctx.detach(), new_ctx.to(dev)]))
        self.tokens = torch.cat([self.tokens, tokens])
        self._frozen = None
        self.zero_shot = torch.cat([self.zero_shot, z])
        self.class_ids += [int(c) for c in class_ids]
        self.class_names += list(names)

    def keys(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """L2-normalised keys (C, D) of the selected classes (all seen classes by default)."""
        rows = slice(None) if rows is None else rows
        if isinstance(rows, slice):
            longest = max(self.eot_on_host[rows], default=0)
        elif rows.device.type == "cpu":  # host row indices: the longest EOT is known without a device sync
            longest = max((self.eot_on_host[i] for i in rows.tolist()), default=0)
            rows = rows.to(self.tokens.device)
        else:
            longest = None
        frozen, eot = self.frozen_embeddings()
        frozen, eot = frozen[rows], eot[rows]
        if self.text.truncate and longest is not None:  # the text path reads no token past the longest EOT
            frozen = frozen[:, :longest + 1]
        g = self.generator(self.zero_shot[rows]).unsqueeze(1).to(frozen.dtype)
        embeds = torch.cat([frozen[:, :1], self.ctx[rows].to(frozen.dtype), g, frozen[:, 2 + self.n_ctx:]], dim=1)
        return normalize(self.text(embeds, eot, longest))

    def frozen_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, context, W) token embeddings of every prompt and their EOT positions (C,): constant while the
        classes and the frozen token table stay the same, so computed once, not at every alignment step."""
        table = self.text.tower.token_embedding.weight
        key = (table.data_ptr(), table._version, self.tokens.device)  # add_classes and _apply reset it too
        if self._frozen is None or self._frozen[0] != key:
            with torch.no_grad():
                self._frozen = (key, self.text.embed_tokens(self.tokens), self.text.eot_positions(self.tokens))
        return self._frozen[1], self._frozen[2]

    def _apply(self, fn, *args, **kwargs):  # .to(device) and friends replace `tokens`: recompute the cache
        self._frozen = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # copies other tokens into `tokens` in place
        self._frozen = None
        return super()._load_from_state_dict(*args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.ctx, *self.generator.parameters()]

    def learned_state(self) -> dict[str, torch.Tensor]:
        """What defines the prompts beyond the frozen CLIP: context vectors and g's weights."""
        state = {"ctx": self.ctx.detach().cpu().contiguous(), "zero_shot": self.zero_shot.detach().cpu().contiguous()}
        state.update({f"generator.{k}": v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()})
        return state

    def load_learned_state(self, state: dict[str, torch.Tensor], class_ids: Sequence[int], names: Sequence[str]) -> None:
        if state["ctx"].shape[0] != len(class_ids):
            raise ValueError("prompt state and class list disagree in length")
        self.class_ids, self.class_names = [], []
        self.ctx = nn.Parameter(torch.zeros(0, self.n_ctx, self.ctx.shape[-1], device=self.ctx.device))
        self.tokens = self.tokens[:0]
        self.eot_on_host = []
        self.zero_shot = self.zero_shot[:0]
        self.add_classes(class_ids, names, torch.Generator(), zero_shot=state.get("zero_shot"))
        self.ctx = nn.Parameter(state["ctx"].to(self.ctx.device))
        gen_state = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
        mine = self.generator.state_dict()
        wrong = [k for k, v in gen_state.items() if k in mine and tuple(v.shape) != tuple(mine[k].shape)]
        if wrong or set(gen_state) != set(mine):
            detail = (f"{wrong[0]} is {tuple(gen_state[wrong[0]].shape)}, expected {tuple(mine[wrong[0]].shape)}"
                      if wrong else f"tensors {sorted(set(gen_state) ^ set(mine))[:3]} differ")
            raise CgilError(
                f"the saved context generator does not fit this model ({detail}); a run saved before cgil "
                f"matched the reference's layer widths for text width != token width must be retrained"
            )
        self.generator.load_state_dict(gen_state)
