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
import torch.nn.functional as F


def class_seed(seed: int, class_id: int, stream: int = 0) -> int:
    """Independent, reproducible stream per (experiment seed, class, purpose)."""
    return int(np.random.SeedSequence([int(seed), int(class_id), stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def class_generators(seed: int, class_ids: Sequence[int], stream: int = 0) -> list[torch.Generator]:
    """One RNG per class. Use a separate `stream` for each kind of draw whose length depends on the
    number of iterations (data order vs. noise), so that no draw shifts another class's stream."""
    return [torch.Generator().manual_seed(class_seed(seed, c, stream)) for c in class_ids]


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
        # (K, B, F) -> (B, K*F): per-channel statistics over the batch are per-class, per-feature
        # statistics, so torch's native batch_norm (one fused pass, fused backward) does all K at once.
        k, b, f = x.shape
        y = F.batch_norm(x.transpose(0, 1).reshape(b, k * f), None, None, self.weight.reshape(k * f),
                         self.bias.reshape(k * f), training=True, eps=self.eps)
        return y.view(b, k, f).transpose(0, 1)


def batch_indices(gens: Sequence[torch.Generator], sizes: Sequence[int], iters: int, batch: int) -> torch.Tensor:
    """(K, iters, batch) sample indices: each class walks its own reshuffled epochs.

    A class's stream does not depend on the other classes (its first steps are the same for any
    `iters`), which keeps batched training equal to training the class alone.
    """
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
    def fit(cls, feats: Sequence[torch.Tensor], eps: float = 1e-8) -> "MinMaxZScore":
        """Statistics per class on its own (unpadded) features: padding would change float sums."""
        scales, shifts = [], []
        for f in feats:
            f = f.float().cpu()
            lo, hi = f.amin(0), f.amax(0)
            rng = (hi - lo).clamp_min(eps)
            u = (f - lo) / rng
            mean, std = u.mean(0), u.std(0).clamp_min(eps)  # unbiased, as the reference's torch.std
            scales.append(std * rng)
            shifts.append(mean * rng + lo)
        return cls(scale=torch.stack(scales).unsqueeze(1), shift=torch.stack(shifts).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.shift


def cosine_warm_restarts(iters: int, t0: int, t_mult: int = 2) -> torch.Tensor:
    """Learning-rate factors for `iters` steps of SGDR (cosine annealing with warm restarts, eta_min 0)."""
    out = torch.empty(iters, dtype=torch.float64)
    t_cur, t_i = 0, max(1, t0)
    for step in range(iters):
        out[step] = 0.5 * (1.0 + math.cos(math.pi * t_cur / t_i))
        t_cur += 1
        if t_cur >= t_i:
            t_cur, t_i = t_cur - t_i, t_i * t_mult
    return out.float()


def lr_table(base_lr: float, iters: Sequence[int], schedule: bool) -> torch.Tensor:
    """(max_iters, K) per-class learning rates; zero once a class has done its own iterations.

    Classes of one task can need different iteration counts (passes x batches of their own size).
    A zero rate freezes a finished class exactly, so a class trained inside a batch ends where it
    would have ended trained alone.
    """
    table = torch.zeros(max(iters), len(iters))
    for k, n in enumerate(iters):
        table[:n, k] = base_lr * (cosine_warm_restarts(n, n // 10) if schedule else torch.ones(n))
    return table


class BatchedAdam:
    """Adam / AdamW for parameters whose first dimension is the class, with a learning rate per class.

    Same update as torch.optim.Adam(W) element by element; only the step size differs per class.
    On a CPU each class's slices go through torch's fused Adam kernel (the one behind
    torch.optim.Adam(fused=True)): one pass over parameter, gradient and moments instead of ~10
    elementwise passes, each class on its own (its tensors stay in cache), so a class updates the same
    whether it trains alone or in a batch. A class whose rate is 0 has finished its own iterations
    (`lr_table`): it is skipped. GPUs take whole tensors with the same formula in plain ops.
    """

    def __init__(self, params: Sequence[torch.Tensor], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = 0
        self._step_t = torch.zeros(())  # the fused kernel reads the step count from a tensor

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        self.steps += 1
        if self.params[0].device.type == "cpu":
            self._step_t.fill_(self.steps)
            fused = torch._fused_adamw_ if self.weight_decay else torch._fused_adam_
            b1, b2 = self.betas
            for k, rate in enumerate(lr.tolist()):
                if rate == 0.0:
                    continue
                fused([p[k] for p in self.params], [p.grad[k] for p in self.params], [m[k] for m in self.m],
                      [v[k] for v in self.v], [], [self._step_t] * len(self.params), lr=rate, beta1=b1,
                      beta2=b2, weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False)
            return
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        for p, m, v in zip(self.params, self.m, self.v):
            step_size = lr.to(p.device).view(-1, *[1] * (p.ndim - 1))
            if self.weight_decay:
                p.mul_(1 - step_size * self.weight_decay)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(step_size * (m / c1) / ((v / c2).sqrt() + self.eps))
