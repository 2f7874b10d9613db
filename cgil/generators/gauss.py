"""One diagonal Gaussian per class: the cheapest generator and a useful floor."""
from __future__ import annotations

from typing import Sequence

import torch

from .base import ClassGenerators, Progress
from .layers import pad_features


class GaussGenerators(ClassGenerators):
    kind = "gauss"
    min_samples = 2

    def build_empty(self) -> None:
        k, d = self.num_classes, self.dim
        self.register_buffer("mean", torch.zeros(k, 1, d))
        self.register_buffer("std", torch.ones(k, 1, d))

    def fit(self, feats: Sequence[torch.Tensor], seed: int, progress: Progress = None) -> dict[str, float]:
        self.check_sizes(feats)
        x, mask = pad_features(feats)
        m = mask.unsqueeze(-1)
        n = m.sum(dim=1, keepdim=True)
        mean = (x * m).sum(dim=1, keepdim=True) / n
        var = (((x - mean) * m) ** 2).sum(dim=1, keepdim=True) / (n - 1)
        self.build_empty()
        self.mean.copy_(mean)
        self.std.copy_(var.clamp_min(1e-12).sqrt())
        if progress:
            progress(1, 1)
        return {}

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.num_classes, n, self.dim, generator=generator).to(self.mean.device)
        return self.mean + self.std * eps
