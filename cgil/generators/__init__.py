"""Per-class generators of CLIP image embeddings (the replay store of CGIL).

`make_generators(kind, class_ids, dim, cfg)` returns one batched model for the classes of a task.
"""
from __future__ import annotations

from typing import Sequence

import torch

from runtime.errors import CgilError
from .base import ClassGenerators, GeneratorConfig
from .diffusion import DiffusionGenerators
from .gauss import GaussGenerators
from .mog import MoGGenerators
from .vae import VAEGenerators

GENERATORS: dict[str, type[ClassGenerators]] = {
    cls.kind: cls for cls in (VAEGenerators, MoGGenerators, GaussGenerators, DiffusionGenerators)
}


def generator_class(kind: str) -> type[ClassGenerators]:
    if kind not in GENERATORS:
        raise CgilError(f"unknown generator {kind!r}; choose one of: {', '.join(GENERATORS)}")
    return GENERATORS[kind]


def make_generators(cfg: GeneratorConfig, class_ids: Sequence[int], dim: int) -> ClassGenerators:
    return generator_class(cfg.kind)(class_ids, dim, cfg)


def load_generators(
    cfg: GeneratorConfig, class_ids: Sequence[int], dim: int, state: dict[str, torch.Tensor]
) -> ClassGenerators:
    return generator_class(cfg.kind).from_replay(class_ids, dim, cfg, state)


__all__ = ["ClassGenerators", "GeneratorConfig", "GENERATORS", "generator_class", "make_generators", "load_generators"]
