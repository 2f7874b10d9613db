"""Per-class denoising diffusion in embedding space.

A small MLP denoiser (5 hidden layers of 256, SiLU, sinusoidal time embedding) predicts the noise;
32-step cosine schedule; AdamW lr 1e-3; ancestral (DDPM) sampling. Same normalisation as the VAE.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import TrainedGenerators, randn_per_class
from .layers import BatchedLinear

_TIME_DIM = 64
_X0_CLIP = 5.0  # normalised data are z-scores


@functools.lru_cache(maxsize=8)
def cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal fractions of the cosine schedule (cached: training asks every step; never mutated)."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def time_embedding(t: torch.Tensor, dim: int = _TIME_DIM) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class _Denoiser(nn.Module):
    def __init__(self, layers: list[BatchedLinear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, time_embedding(t)], dim=-1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.silu(h)
        return h


class DiffusionGenerators(TrainedGenerators):
    kind = "diffusion"
    min_samples = 2
    default_lr = 1e-3
    weight_decay = 0.01  # AdamW's default

    def _layer_shapes(self) -> list[tuple[int, int]]:
        d, h, n = self.dim, self.cfg.diffusion_hidden, self.cfg.diffusion_layers
        return [(d + _TIME_DIM, h)] + [(h, h)] * (n - 1) + [(h, d)]

    def build_empty(self) -> None:
        k = self.num_classes
        self.denoiser = _Denoiser([BatchedLinear.empty(k, i, o) for i, o in self._layer_shapes()])
        self.register_buffer("norm_scale", torch.ones(k, 1, self.dim))
        self.register_buffer("norm_shift", torch.zeros(k, 1, self.dim))
        self.register_buffer("alpha_bar", cosine_alpha_bar(self.cfg.diffusion_steps).clone())

    def build_networks(self, gens: Sequence[torch.Generator]) -> nn.Module:
        return nn.ModuleDict({"denoiser": _Denoiser([BatchedLinear(gens, i, o) for i, o in self._layer_shapes()])})

    def draw_noise(self, gens: Sequence[torch.Generator], steps: int) -> tuple[torch.Tensor, ...]:
        noise = randn_per_class(gens, (steps, self.cfg.batch_size, self.dim))
        t = torch.stack([torch.randint(0, self.cfg.diffusion_steps, (steps, self.cfg.batch_size), generator=g)
                         for g in gens])
        return noise, t

    def batch_loss(self, nets: nn.Module, x: torch.Tensor, noise: tuple[torch.Tensor, ...]) -> torch.Tensor:
        eps, t = noise
        ab = cosine_alpha_bar(self.cfg.diffusion_steps).to(x.device)[t].unsqueeze(-1)
        xt = ab.sqrt() * x + (1 - ab).sqrt() * eps
        return (nets["denoiser"](xt, t) - eps).pow(2).mean(dim=(1, 2))

    def keep(self, nets: nn.Module) -> None:
        self.denoiser.load_state_dict(nets["denoiser"].state_dict())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        dev = self.norm_scale.device
        ab = self.alpha_bar
        k, steps = self.num_classes, ab.shape[0]
        x = torch.randn(k, n, self.dim, generator=generator).to(dev)
        for t in range(steps - 1, -1, -1):
            ab_t = ab[t]
            ab_prev = ab[t - 1] if t > 0 else torch.ones((), device=dev)
            beta = 1 - ab_t / ab_prev
            eps = self.denoiser(x, torch.full((k, n), t, device=dev))
            # Predict x0 and clip it to the z-score range seen in training: the last cosine-schedule
            # steps have beta near 1, and an unclipped epsilon-form update amplifies errors ~30x.
            x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-_X0_CLIP, _X0_CLIP)
            x = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x) / (1 - ab_t)
            if t > 0:
                var = beta * (1 - ab_prev) / (1 - ab_t)
                x = x + var.sqrt() * torch.randn(k, n, self.dim, generator=generator).to(dev)
        return x * self.norm_scale + self.norm_shift
