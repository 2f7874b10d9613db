"""Per-class VAEs in embedding space: the reference default generator.

Encoder D->512->512->2*256 (BatchNorm + LeakyReLU(0.2)), decoder 256->512->512->D (LeakyReLU(0.2)).
Loss: unit-variance Gaussian NLL (summed) + KL to N(0, I), divided by the batch size; Adam 2e-4,
cosine annealing with warm restarts (T_0 = iterations/10, T_mult = 2).

Reparameterisation uses std = exp(0.5 * logvar). The reference code uses exp(logvar), i.e. its
"logvar" is really a log standard deviation; the two are the same family, parameterised
differently.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import TrainedGenerators, randn_per_class
from .layers import BatchedBatchNorm, BatchedLinear


class _Decoder(nn.Module):
    def __init__(self, layers: list[BatchedLinear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(z)
            if i < len(self.layers) - 1:
                z = F.leaky_relu(z, 0.2)
        return z


class VAEGenerators(TrainedGenerators):
    kind = "vae"
    min_samples = 2  # BatchNorm needs two samples to have a variance
    default_lr = 2e-4
    schedule = True

    def build_empty(self) -> None:
        k, d, h, l = self.num_classes, self.dim, self.cfg.hidden_dim, self.cfg.latent_dim
        self.decoder = _Decoder([BatchedLinear.empty(k, l, h), BatchedLinear.empty(k, h, h), BatchedLinear.empty(k, h, d)])
        self.register_buffer("norm_scale", torch.ones(k, 1, d))
        self.register_buffer("norm_shift", torch.zeros(k, 1, d))

    def build_networks(self, gens: Sequence[torch.Generator]) -> nn.Module:
        k, d, h, l = self.num_classes, self.dim, self.cfg.hidden_dim, self.cfg.latent_dim
        encoder = nn.ModuleList([
            BatchedLinear(gens, d, h), BatchedBatchNorm(k, h),
            BatchedLinear(gens, h, h), BatchedBatchNorm(k, h),
            BatchedLinear(gens, h, 2 * l),
        ])
        decoder = _Decoder([BatchedLinear(gens, l, h), BatchedLinear(gens, h, h), BatchedLinear(gens, h, d)])
        return nn.ModuleDict({"encoder": encoder, "decoder": decoder})

    def draw_noise(self, gens: Sequence[torch.Generator], steps: int) -> tuple[torch.Tensor, ...]:
        return (randn_per_class(gens, (steps, self.cfg.batch_size, self.cfg.latent_dim)),)

    def batch_loss(self, nets: nn.Module, x: torch.Tensor, noise: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden = x
        for layer in nets["encoder"]:
            hidden = layer(hidden)
            if isinstance(layer, BatchedBatchNorm):
                hidden = F.leaky_relu(hidden, 0.2)
        mu, logvar = hidden.chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * logvar) * noise[0]
        nll = 0.5 * (nets["decoder"](z) - x).pow(2).sum(dim=(1, 2))
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=(1, 2))
        return (nll + kl) / x.shape[1]

    def keep(self, nets: nn.Module) -> None:
        self.decoder.load_state_dict(nets["decoder"].state_dict())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.num_classes, n, self.cfg.latent_dim, generator=generator).to(self.norm_scale.device)
        return self.decoder(z) * self.norm_scale + self.norm_shift
