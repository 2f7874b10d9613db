"""The interface every per-class generator family implements, and its configuration."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import nn

from runtime.errors import CgilError

Progress = Optional[Callable[[int, int], None]]  # (done, total) -> None


@dataclass
class GeneratorConfig:
    kind: str = "vae"
    passes: int = 500  # passes over each class's features (VAE, diffusion); 750 on ISIC in the paper
    batch_size: int = 64
    # Least optimiser steps per class (VAE, diffusion), whatever `passes`: a class of 15 images is one batch,
    # so 50 passes are 50 steps and its VAE replays under 1% of the real variance (collapse); 300 steps give
    # ~21%, as much as 500 (docs/training.md). 0 (the reference): passes alone decide. The folder: preset sets it.
    min_steps: int = 0
    lr: Optional[float] = None  # None: the family's reference default
    latent_dim: int = 256  # VAE
    hidden_dim: int = 512  # VAE
    vae_objective: str = "reference"  # VAE: "reference" (z = mu + exp(s) eps, the reference's KL) or "textbook"
    # VAE on a CPU (reference objective): the hand-written step (vae_cpu.py), bit for bit the batched autograd
    # loop's result for less CPU time. False runs the autograd loop (what GPUs run), e.g. to time both.
    vae_cpu_step: bool = True
    components: int = 5  # MoG
    em_steps: int = 500  # MoG
    em_tol: float = 1e-3  # MoG: stop when the mean log-likelihood gains less than this
    mog_estep: str = "exact"  # MoG: "exact" Gaussian responsibilities, or the reference code's ("reference")
    diffusion_steps: int = 32
    diffusion_hidden: int = 256
    diffusion_layers: int = 5
    seed: Optional[int] = None  # generator fitting seed; None: the run's seed (which also sets the class order)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeneratorConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ClassGenerators(nn.Module, ABC):
    """K class-conditional generators of D-dim embeddings, fitted and sampled as one model.

    After `fit`, the module's state_dict holds exactly what sampling needs (the replay store);
    `from_replay` rebuilds a sampler from it without any training-only parts.
    """

    kind: ClassVar[str]
    min_samples: ClassVar[int] = 2
    default_lr: ClassVar[float] = 0.0

    def __init__(self, class_ids: Sequence[int], dim: int, cfg: GeneratorConfig):
        super().__init__()
        self.class_ids = [int(c) for c in class_ids]
        self.dim = int(dim)
        self.cfg = cfg

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr is not None else self.default_lr

    def iterations(self, sizes: Sequence[int]) -> list[int]:
        """Per class: `passes` passes over its own features in batches of batch_size, and at least min_steps."""
        return [max(self.cfg.passes * max(1, math.ceil(n / self.cfg.batch_size)), self.cfg.min_steps) for n in sizes]

    def check_sizes(self, feats: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None) -> None:
        if len(feats) != self.num_classes:
            raise ValueError(f"expected features of {self.num_classes} classes, got {len(feats)}")
        for k, f in enumerate(feats):
            if f.ndim != 2 or f.shape[1] != self.dim:
                raise CgilError(f"features of class {self.class_ids[k]} have shape {tuple(f.shape)}, expected (n, {self.dim})")
            if f.shape[0] < self.min_samples:
                who = names[k] if names else f"class {self.class_ids[k]}"
                raise CgilError(
                    f"{who} has {f.shape[0]} training sample(s); the {self.kind} generator needs at least "
                    f"{self.min_samples}"
                )

    @abstractmethod
    def fit(self, feats: Sequence[torch.Tensor], seed: int, progress: Progress = None) -> dict[str, float]:
        """Fit all K generators on per-class (n_k, D) features. Returns summary statistics."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(K, n, D) synthetic embeddings, on this module's device."""

    @classmethod
    def from_replay(cls, class_ids: Sequence[int], dim: int, cfg: GeneratorConfig, state: dict[str, torch.Tensor]):
        gen = cls(class_ids, dim, cfg)
        gen.build_empty()
        gen.load_state_dict(state)
        return gen

    @abstractmethod
    def build_empty(self) -> None:
        """Create sampling-only submodules/buffers with the right shapes (for from_replay)."""

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")


class TrainedGenerators(ClassGenerators):
    """Families trained by gradient descent on normalised embeddings (VAE, diffusion): one shared loop.

    Subclasses say what the networks are, what noise one step needs, and the per-class loss; the
    loop, the per-class data order, learning rates and RNG streams, and the normalisation live here.
    """

    schedule: ClassVar[bool] = False  # SGDR warm restarts (the VAE's reference schedule)
    weight_decay: ClassVar[float] = 0.0
    noise_chunk: ClassVar[int] = 64  # steps of noise drawn at once per class

    @abstractmethod
    def build_networks(self, gens: Sequence[torch.Generator]) -> nn.Module:
        """All trainable modules, initialised from the per-class generators."""

    @abstractmethod
    def draw_noise(self, gens: Sequence[torch.Generator], steps: int) -> tuple[torch.Tensor, ...]:
        """Noise for `steps` steps, each tensor (K, steps, ...), class k from its own generator."""

    @abstractmethod
    def batch_loss(self, nets: nn.Module, x: torch.Tensor, noise: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(K,) losses of one step on normalised batches x (K, B, D)."""

    @abstractmethod
    def keep(self, nets: nn.Module) -> None:
        """Copy the sampling-only part of the trained networks into this (empty-built) module."""

    def fit(self, feats: Sequence[torch.Tensor], seed: int, progress: Progress = None) -> dict[str, Any]:
        from .layers import BatchedAdam, MinMaxZScore, batch_indices, class_generators, lr_table, pad_features

        self.check_sizes(feats)
        device = feats[0].device
        sizes = [f.shape[0] for f in feats]
        norm = MinMaxZScore.fit(feats)
        x = norm.forward(pad_features(feats)[0]).to(device)
        gens = class_generators(seed, self.class_ids)
        nets = self.build_networks(gens).to(device)
        per_class_iters = self.iterations(sizes)
        iters = max(per_class_iters)
        idx = batch_indices(class_generators(seed, self.class_ids, stream=1), sizes, iters, self.cfg.batch_size)
        idx = idx.to(device)
        lrs = lr_table(self.lr, per_class_iters, schedule=self.schedule).to(device)  # no host copy per step
        opt = BatchedAdam(list(nets.parameters()), weight_decay=self.weight_decay)
        last_loss = torch.zeros(self.num_classes)  # each class's loss at its own last step
        ends_at: dict[int, list[int]] = {}
        for k, n in enumerate(per_class_iters):
            ends_at.setdefault(n - 1, []).append(k)
        for it in range(iters):
            if it % self.noise_chunk == 0:  # whole chunks always, so a class's streams never depend on K
                noise = tuple(n.to(device) for n in self.draw_noise(gens, self.noise_chunk))
            xb = torch.gather(x, 1, idx[:, it, :, None].expand(-1, -1, self.dim))
            loss_k = self.batch_loss(nets, xb, tuple(n[:, it % self.noise_chunk] for n in noise))
            if it in ends_at:
                last_loss[ends_at[it]] = loss_k.detach()[ends_at[it]].cpu()
            opt.zero_grad()
            loss_k.sum().backward()  # classes share no parameters: each gets exactly its own gradient
            opt.step(lrs[it])
            if progress:
                progress(it + 1, iters)
        self.build_empty()
        self.keep(nets)
        self.norm_scale.copy_(norm.scale)
        self.norm_shift.copy_(norm.shift)
        self.to(device)
        return {"iterations": per_class_iters, "final_loss": float(last_loss.mean())}


def randn_per_class(gens: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """(K, *shape) standard normals, class k drawn from its own generator.

    Callers always draw whole chunks of the same shape, so a class's noise stream is the same
    whether it trains alone or in a batch.
    """
    return torch.stack([torch.randn(*shape, generator=g) for g in gens])
