"""Per-class denoising diffusion in embedding space.

A small MLP denoiser (5 hidden layers of 256, SiLU, sinusoidal time embedding) predicts the noise;
32-step cosine schedule; AdamW lr 1e-3; ancestral (DDPM) sampling. Same normalisation as the VAE.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassGenerators, Progress, randn_per_class
from .layers import BatchedAdam, BatchedLinear, MinMaxZScore, batch_indices, class_generators, lr_table, pad_features

_TIME_DIM = 64
_NOISE_CHUNK = 64
_X0_CLIP = 5.0  # normalised data are z-scores


def cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
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


class DiffusionGenerators(ClassGenerators):
    kind = "diffusion"
    min_samples = 2
    default_lr = 1e-3

    def _layer_shapes(self) -> list[tuple[int, int]]:
        d, h, n = self.dim, self.cfg.diffusion_hidden, self.cfg.diffusion_layers
        return [(d + _TIME_DIM, h)] + [(h, h)] * (n - 1) + [(h, d)]

    def build_empty(self) -> None:
        k = self.num_classes
        self.denoiser = _Denoiser([BatchedLinear.empty(k, i, o) for i, o in self._layer_shapes()])
        self.register_buffer("norm_scale", torch.ones(k, 1, self.dim))
        self.register_buffer("norm_shift", torch.zeros(k, 1, self.dim))
        self.register_buffer("alpha_bar", cosine_alpha_bar(self.cfg.diffusion_steps))

    def fit(self, feats: Sequence[torch.Tensor], seed: int, progress: Progress = None) -> dict[str, float]:
        self.check_sizes(feats)
        device = feats[0].device
        d, bsz, steps = self.dim, self.cfg.batch_size, self.cfg.diffusion_steps
        sizes = [f.shape[0] for f in feats]
        x, mask = pad_features(feats)
        norm = MinMaxZScore.fit(feats)
        x = norm.forward(x).to(device)
        gens = class_generators(seed, self.class_ids)
        net = _Denoiser([BatchedLinear(gens, i, o) for i, o in self._layer_shapes()]).to(device)
        per_class_iters = self.iterations(sizes)
        iters = max(per_class_iters)
        idx = batch_indices(class_generators(seed, self.class_ids, stream=1), sizes, iters, bsz).to(device)
        alpha_bar = cosine_alpha_bar(steps).to(device)
        lrs = lr_table(self.lr, per_class_iters, schedule=False)
        opt = BatchedAdam(list(net.parameters()), weight_decay=0.01)  # AdamW's default decay
        loss_k = torch.zeros(self.num_classes)
        for it in range(iters):
            if it % _NOISE_CHUNK == 0:
                chunk = _NOISE_CHUNK
                noise = randn_per_class(gens, (chunk, bsz, d)).to(device)
                tsteps = torch.stack([torch.randint(0, steps, (chunk, bsz), generator=g) for g in gens]).to(device)
            eps, t = noise[:, it % _NOISE_CHUNK], tsteps[:, it % _NOISE_CHUNK]
            x0 = torch.gather(x, 1, idx[:, it, :, None].expand(-1, -1, d))
            ab = alpha_bar[t].unsqueeze(-1)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            loss_k = (net(xt, t) - eps).pow(2).mean(dim=(1, 2))
            opt.zero_grad()
            loss_k.sum().backward()
            opt.step(lrs[it])
            if progress:
                progress(it + 1, iters)
        self.build_empty()
        self.denoiser.load_state_dict(net.state_dict())
        self.norm_scale.copy_(norm.scale)
        self.norm_shift.copy_(norm.shift)
        self.to(device)
        return {"iterations": per_class_iters, "final_loss": float(loss_k.detach().mean())}

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
