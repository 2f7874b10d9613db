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

from .base import ClassGenerators, Progress, randn_per_class
from .layers import (BatchedAdam, BatchedBatchNorm, BatchedLinear, MinMaxZScore, batch_indices, class_generators,
                     lr_table, pad_features)

_NOISE_CHUNK = 64  # iterations of reparameterisation noise drawn at once per class


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


class VAEGenerators(ClassGenerators):
    kind = "vae"
    min_samples = 2  # BatchNorm needs two samples to have a variance
    default_lr = 2e-4

    def build_empty(self) -> None:
        k, d, h, l = self.num_classes, self.dim, self.cfg.hidden_dim, self.cfg.latent_dim
        self.decoder = _Decoder([BatchedLinear.empty(k, l, h), BatchedLinear.empty(k, h, h), BatchedLinear.empty(k, h, d)])
        self.register_buffer("norm_scale", torch.ones(k, 1, d))
        self.register_buffer("norm_shift", torch.zeros(k, 1, d))

    def fit(self, feats: Sequence[torch.Tensor], seed: int, progress: Progress = None) -> dict[str, float]:
        self.check_sizes(feats)
        device = feats[0].device
        d, h, l, bsz = self.dim, self.cfg.hidden_dim, self.cfg.latent_dim, self.cfg.batch_size
        sizes = [f.shape[0] for f in feats]
        x, mask = pad_features(feats)
        norm = MinMaxZScore.fit(feats)
        x = norm.forward(x).to(device)

        gens = class_generators(seed, self.class_ids)
        enc = nn.ModuleList([
            BatchedLinear(gens, d, h), BatchedBatchNorm(self.num_classes, h),
            BatchedLinear(gens, h, h), BatchedBatchNorm(self.num_classes, h),
            BatchedLinear(gens, h, 2 * l),
        ]).to(device)
        dec = _Decoder([BatchedLinear(gens, l, h), BatchedLinear(gens, h, h), BatchedLinear(gens, h, d)]).to(device)
        per_class_iters = self.iterations(sizes)
        iters = max(per_class_iters)
        idx = batch_indices(class_generators(seed, self.class_ids, stream=1), sizes, iters, bsz).to(device)
        lrs = lr_table(self.lr, per_class_iters, schedule=True)  # SGDR, T_0 = iters/10, T_mult = 2

        opt = BatchedAdam([*enc.parameters(), *dec.parameters()])
        loss_k = torch.zeros(self.num_classes)
        for it in range(iters):
            if it % _NOISE_CHUNK == 0:
                noise = randn_per_class(gens, (_NOISE_CHUNK, bsz, l)).to(device)
            gather_index = idx[:, it, :, None].expand(-1, -1, d)
            xb = torch.gather(x, 1, gather_index)
            hidden = xb
            for i, layer in enumerate(enc):
                hidden = layer(hidden)
                if isinstance(layer, BatchedBatchNorm):
                    hidden = F.leaky_relu(hidden, 0.2)
            mu, logvar = hidden.chunk(2, dim=-1)
            z = mu + torch.exp(0.5 * logvar) * noise[:, it % _NOISE_CHUNK]
            recon = dec(z)
            nll = 0.5 * (recon - xb).pow(2).sum(dim=(1, 2))
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=(1, 2))
            loss_k = (nll + kl) / bsz
            opt.zero_grad()
            loss_k.sum().backward()  # classes share no parameters: each gets exactly its own gradient
            opt.step(lrs[it])
            if progress:
                progress(it + 1, iters)

        self.build_empty()
        self.decoder.load_state_dict(dec.state_dict())
        self.norm_scale.copy_(norm.scale)
        self.norm_shift.copy_(norm.shift)
        self.to(device)
        return {"iterations": per_class_iters, "final_loss": float(loss_k.detach().mean())}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.num_classes, n, self.cfg.latent_dim, generator=generator).to(self.norm_scale.device)
        return self.decoder(z) * self.norm_scale + self.norm_shift
