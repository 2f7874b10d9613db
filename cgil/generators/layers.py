"""Building blocks for K independent per-class networks trained as one batched model.

A batched linear layer holds weights of shape (K, in, out) and maps (K, B, in) -> (K, B, out)
with one `baddbmm`. Each class's parameters are initialised from that class's own RNG, so a
class trained inside a batch of K equals the same class trained alone (K = 1) with the same seed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn


def class_seed(seed: int, class_id: int) -> int:
    """Independent, reproducible stream per (experiment seed, class)."""
    return int(np.random.SeedSequence([int(seed), int(class_id)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def class_generators(seed: int, class_ids: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(class_seed(seed, c)) for c in class_ids]


class BatchedLinear(nn.Module):
    def __init__(self, gens: Sequence[torch.Generator], fan_in: int, fan_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, drawn per class
        w = torch.stack([torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=g) for g in gens])
        b = torch.stack([torch.empty(1, fan_out).uniform_(-bound, bound, generator=g) for g in gens])
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)

    @classmethod
    def empty(cls, k: int, fan_in: int, fan_out: int) -> "BatchedLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = nn.Parameter(torch.zeros(k, fan_in, fan_out))
        layer.bias = nn.Parameter(torch.zeros(k, 1, fan_out))
        return layer


class BatchedBatchNorm(nn.Module):
    """BatchNorm1d in training mode, statistics taken per class over that class's batch.

    Only encoders use it and encoders are never kept, so no running statistics are tracked.
    """

    def __init__(self, k: int, features: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, features))
        self.bias = nn.Parameter(torch.zeros(k, 1, features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def batch_indices(gens: Sequence[torch.Generator], sizes: Sequence[int], iters: int, batch: int) -> torch.Tensor:
    """(K, iters, batch) sample indices: each class walks its own reshuffled epochs."""
    out = torch.empty(len(gens), iters * batch, dtype=torch.long)
    for k, (g, n) in enumerate(zip(gens, sizes)):
        need = iters * batch
        perms = [torch.randperm(n, generator=g) for _ in range(-(-need // n))]
        out[k] = torch.cat(perms)[:need]
    return out.view(len(gens), iters, batch)


def pad_features(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-class (n_k, D) features into (K, N_max, D) with a (K, N_max) validity mask."""
    n_max = max(f.shape[0] for f in feats)
    d = feats[0].shape[1]
    x = torch.zeros(len(feats), n_max, d, dtype=torch.float32)
    mask = torch.zeros(len(feats), n_max, dtype=torch.bool)
    for k, f in enumerate(feats):
        x[k, : f.shape[0]] = f.float().cpu()
        mask[k, : f.shape[0]] = True
    return x, mask


class MinMaxZScore:
    """The reference normalisation: per-dimension min-max scaling, then z-scoring.

    Both steps are affine per dimension, so the inverse is kept as one (scale, shift) pair:
    x = z * scale + shift. That pair is all the replay store needs.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        self.scale, self.shift = scale, shift  # (K, 1, D)

    @classmethod
    def fit(cls, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> "MinMaxZScore":
        m = mask.unsqueeze(-1)
        lo = torch.where(m, x, torch.full_like(x, float("inf"))).amin(dim=1, keepdim=True)
        hi = torch.where(m, x, torch.full_like(x, float("-inf"))).amax(dim=1, keepdim=True)
        rng = (hi - lo).clamp_min(eps)
        u = (x - lo) / rng
        n = m.sum(dim=1, keepdim=True).clamp_min(1)
        mean = (u * m).sum(dim=1, keepdim=True) / n
        std = ((((u - mean) * m) ** 2).sum(dim=1, keepdim=True) / n).sqrt().clamp_min(eps)
        return cls(scale=std * rng, shift=mean * rng + lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.shift
