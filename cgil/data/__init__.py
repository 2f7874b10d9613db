"""Dataset registry: `get_dataset("digits")`, `get_dataset("folder:/path")`, or a registered name.

Registered: digits (offline demo) and the paper's benchmarks read from their official layouts:
imagenet-r, cub200, cars196, eurosat-rgb, isic, and cifar100 (see cgil/data/catalog.py).

A loader is `fn(data_dir: Path | None) -> ImageDataset`; register more with `register_dataset`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from runtime.errors import CgilError
from .base import ImageDataset, Split, load_image, to_rgb

Loader = Callable[[Optional[Path]], ImageDataset]
_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        _REGISTRY[name] = fn
        return fn

    return wrap


@register_dataset("digits")
def _digits(data_dir: Optional[Path]) -> ImageDataset:
    from .digits import load_digits_dataset

    return load_digits_dataset()


def dataset_choices() -> list[str]:
    return sorted(_REGISTRY) + ["folder:PATH"]


def get_dataset(spec: str, data_dir: Optional[str | Path] = None) -> ImageDataset:
    if spec.startswith("folder:"):
        from .folder import load_folder_dataset

        ds = load_folder_dataset(spec[len("folder:"):])
    elif spec in _REGISTRY:
        ds = _REGISTRY[spec](Path(data_dir).expanduser() if data_dir else None)
    else:
        raise CgilError(f"unknown dataset {spec!r}; choose one of: {', '.join(dataset_choices())}")
    ds.check()
    return ds


# The paper's benchmarks (and CIFAR-100): each module registers its loader on import.
from . import cars196, cifar100, cub200, eurosat, imagenet_r, isic  # noqa: E402,F401

__all__ = ["ImageDataset", "Split", "get_dataset", "dataset_choices", "register_dataset", "load_image", "to_rgb"]
