"""Per-class diagonal Gaussian mixtures: k-means initialisation, then EM, all classes at once."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from runtime.errors import CgilError
from ..choices import MOG_ESTEPS
from .base import ClassGenerators, Progress
from .layers import class_generators, pad_features

_KMEANS_STEPS = 30
_REG_VAR = 1e-6  # added to every variance, as scikit-learn's reg_covar


def _log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, estep: str = "exact") -> torch.Tensor:
    """(K, N, M) diagonal-Gaussian log densities of x (K, N, D) under M components (K, M, D).

    estep="reference" reproduces the reference code's E-step, which weighs squared deviations by 1/std
    (rsqrt(var)) instead of 1/var and uses sum(log std) as the log-determinant term: not a Gaussian density,
    but what its responsibilities are computed from (sampling uses the right std in both).
    """
    if estep == "reference":
        prec, log_det = torch.rsqrt(var), 0.5 * torch.log(var).sum(-1).unsqueeze(1)
    else:
        prec, log_det = 1.0 / var, torch.log(var).sum(-1).unsqueeze(1)
    maha = (
        (x * x) @ prec.transpose(1, 2)
        - 2.0 * x @ (mean * prec).transpose(1, 2)
        + (mean * mean * prec).sum(-1).unsqueeze(1)
    )
    return -0.5 * (maha + log_det + x.shape[-1] * math.log(2 * math.pi))


class MoGGenerators(ClassGenerators):
    kind = "mog"
    min_samples = 2  # fewer points than components: the class uses one component per point

    def __init__(self, class_ids: Sequence[int], dim: int, cfg):
        if cfg.mog_estep not in MOG_ESTEPS:
            raise CgilError(f"unknown MoG E-step {cfg.mog_estep!r}; choose one of: {', '.join(MOG_ESTEPS)}")
        super().__init__(class_ids, dim, cfg)

    def build_empty(self) -> None:
        k, m, d = self.num_classes, self.cfg.components, self.dim
        self.register_buffer("weights", torch.zeros(k, m))
        self.register_buffer("means", torch.zeros(k, m, d))
        self.register_buffer("stds", torch.ones(k, m, d))

    def _m_step(self, x, mask, resp):
        resp = resp * mask.unsqueeze(-1)
        nk = resp.sum(1) + 1e-10  # (K, M)
        mean = resp.transpose(1, 2) @ x / nk.unsqueeze(-1)
        var = resp.transpose(1, 2) @ (x * x) / nk.unsqueeze(-1) - mean * mean
        return nk / mask.sum(1, keepdim=True), mean, var.clamp_min(0) + _REG_VAR

    def fit(self, feats: Sequence[torch.Tensor], seed: int, progress: Progress = None) -> dict[str, float]:
        self.check_sizes(feats)
        device = feats[0].device
        x, mask = pad_features(feats)
        k, n_max, _ = x.shape
        m = self.cfg.components
        sizes = [f.shape[0] for f in feats]
        active = torch.stack([torch.arange(m) < min(m, n) for n in sizes])  # (K, M)

        # k-means++-free init: distinct random points per class from that class's own RNG.
        gens = class_generators(seed, self.class_ids)
        centers = torch.zeros(k, m, self.dim)
        for c, (g, n) in enumerate(zip(gens, sizes)):
            pick = torch.randperm(n, generator=g)[: min(m, n)]
            centers[c, : len(pick)] = x[c, pick]
        x, mask, active, centers = x.to(device), mask.to(device), active.to(device), centers.to(device)
        inactive = torch.where(active, 0.0, float("inf")).unsqueeze(1)  # (K, 1, M)
        for _ in range(_KMEANS_STEPS):
            dist = torch.cdist(x, centers) + inactive
            onehot = torch.nn.functional.one_hot(dist.argmin(-1), m).float() * mask.unsqueeze(-1)
            counts = onehot.sum(1).unsqueeze(-1)
            centers = torch.where(counts > 0, onehot.transpose(1, 2) @ x / counts.clamp_min(1), centers)
        weights, mean, var = self._m_step(x, mask, onehot)

        prev = torch.full((k,), -float("inf"), device=device)
        log_inactive = torch.where(active, 0.0, -float("inf")).unsqueeze(1)
        steps = 0
        for steps in range(1, self.cfg.em_steps + 1):
            logp = _log_prob(x, mean, var, self.cfg.mog_estep) + torch.log(weights.clamp_min(1e-30)).unsqueeze(1) + log_inactive
            norm = torch.logsumexp(logp, dim=-1)  # (K, N)
            ll = (norm * mask).sum(1) / mask.sum(1)
            weights, mean, var = self._m_step(x, mask, torch.exp(logp - norm.unsqueeze(-1)))
            weights = weights * active
            if progress:
                progress(steps, self.cfg.em_steps)
            if bool(((ll - prev).abs() < self.cfg.em_tol).all()):
                break
            prev = ll
        self.build_empty()
        self.to(device)
        self.weights.copy_(weights / weights.sum(-1, keepdim=True))
        self.means.copy_(mean)
        self.stds.copy_(var.sqrt())
        return {"em_steps": steps, "mean_log_likelihood": float(ll.mean())}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        comp = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)  # (K, n)
        eps = torch.randn(self.num_classes, n, self.dim, generator=generator)
        comp = comp.to(self.means.device).unsqueeze(-1).expand(-1, -1, self.dim)
        return torch.gather(self.means, 1, comp) + torch.gather(self.stds, 1, comp) * eps.to(self.means.device)
