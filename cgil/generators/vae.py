"""Per-class VAEs in embedding space: the reference default generator.

Encoder D->512->512->2*256 (BatchNorm + LeakyReLU(0.2)), decoder 256->512->512->D (LeakyReLU(0.2)).
Loss: unit-variance Gaussian NLL (summed) + KL to N(0, I), divided by the batch size; Adam 2e-4,
cosine annealing with warm restarts (T_0 = iterations/10, T_mult = 2).

Reparameterisation (`vae_objective`):
- "reference" (default): exactly the reference code. The encoder's second half s (the reference
  calls it "logvar") is used as a log standard deviation, z = mu + exp(s) * eps, and the KL term is
  the reference's 0.5 * sum(exp(s) + mu^2 - 1 - s). That KL is not the KL of N(mu, exp(s)^2) to N(0, I):
  it penalises the posterior's spread less, and measured on identical features its replay keeps ~2.3x
  more of the real features' variance than the textbook form (docs/reference-differences.md).
- "textbook": std = exp(0.5 * logvar) with its exact KL -0.5 * sum(1 + logvar - mu^2 - exp(logvar)).
The reconstruction term is the reference's unit-variance Gaussian NLL with its constant
(gaussian_nll_loss(full=True, reduction="sum")), so reported losses are comparable too.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import CgilError
from ..choices import VAE_OBJECTIVES
from .base import TrainedGenerators, randn_per_class
from .layers import BatchedBatchNorm, BatchedLinear


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


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

    def __init__(self, class_ids: Sequence[int], dim: int, cfg):
        if cfg.vae_objective not in VAE_OBJECTIVES:
            raise CgilError(f"unknown VAE objective {cfg.vae_objective!r}; choose one of: {', '.join(VAE_OBJECTIVES)}")
        super().__init__(class_ids, dim, cfg)

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
        mu, s = hidden.chunk(2, dim=-1)
        if self.cfg.vae_objective == "textbook":
            z = mu + torch.exp(0.5 * s) * noise[0]
            kl = -0.5 * (1 + s - mu.pow(2) - s.exp()).sum(dim=(1, 2))
        else:  # the reference's: s is a log std in the sample, and its KL as the reference writes it
            z = mu + torch.exp(s) * noise[0]
            kl = 0.5 * (s.exp() + mu.pow(2) - 1 - s).sum(dim=(1, 2))
        nll = 0.5 * (nets["decoder"](z) - x).pow(2).sum(dim=(1, 2)) + _HALF_LOG_2PI * x.shape[1] * x.shape[2]
        return (nll + kl) / x.shape[1]

    def fit(self, feats: Sequence[torch.Tensor], seed: int, progress=None) -> dict:
        """On a CPU with the reference objective (and `vae_cpu_step`, the default): the hand-written step of
        vae_cpu.py, one class after another, bit for bit the batched autograd loop's result for less CPU
        time; otherwise (GPUs, the textbook objective) the shared batched autograd loop."""
        if feats[0].device.type != "cpu" or not self.cfg.vae_cpu_step or self.cfg.vae_objective != "reference":
            return super().fit(feats, seed, progress)
        return self._fit_cpu(feats, seed, progress)

    def _fit_cpu(self, feats: Sequence[torch.Tensor], seed: int, progress=None) -> dict:
        from .layers import MinMaxZScore, batch_indices, class_generators, lr_table, pad_features
        from .vae_cpu import FlatVAE

        self.check_sizes(feats)
        cfg = self.cfg
        sizes = [f.shape[0] for f in feats]
        norm = MinMaxZScore.fit(feats)
        x = norm.forward(pad_features(feats)[0])
        gens = class_generators(seed, self.class_ids)
        per_class_iters = self.iterations(sizes)
        idx = batch_indices(class_generators(seed, self.class_ids, stream=1), sizes, max(per_class_iters),
                            cfg.batch_size)
        lrs = lr_table(self.lr, per_class_iters, schedule=self.schedule)
        self.build_empty()
        done, total = 0, sum(per_class_iters)
        last_loss = torch.zeros(self.num_classes)  # as the batched loop keeps it: float32, one per class
        for k, gen in enumerate(gens):
            nets = self.build_networks([gen])  # class k's initial draws, exactly as in the batched build
            flat = FlatVAE(self.dim, cfg.hidden_dim, cfg.latent_dim)
            flat.load(nets["encoder"], nets["decoder"].layers)
            rates = lrs[:, k].tolist()
            for it in range(per_class_iters[k]):
                if it % self.noise_chunk == 0:  # whole chunks from the class's own stream, as the batched loop
                    noise = self.draw_noise([gen], self.noise_chunk)[0][0]
                xb = torch.gather(x[k], 0, idx[k, it, :, None].expand(-1, self.dim))  # the loop's gather
                last = it == per_class_iters[k] - 1
                loss = flat.step(xb, noise[it % self.noise_chunk], rates[it], want_loss=last)
                if last:
                    last_loss[k] = loss
                done += 1
                if progress:
                    progress(done, total)
            with torch.no_grad():
                for layer, (w, b) in zip(self.decoder.layers, flat.decoder_state()):
                    layer.weight[k].copy_(w)
                    layer.bias[k].copy_(b.view(1, -1))
        self.norm_scale.copy_(norm.scale)
        self.norm_shift.copy_(norm.shift)
        return {"iterations": per_class_iters, "final_loss": float(last_loss.mean())}

    def keep(self, nets: nn.Module) -> None:
        self.decoder.load_state_dict(nets["decoder"].state_dict())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.num_classes, n, self.cfg.latent_dim, generator=generator).to(self.norm_scale.device)
        return self.decoder(z) * self.norm_scale + self.norm_shift
