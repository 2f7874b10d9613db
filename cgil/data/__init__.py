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


def check_dataset_name(spec: str) -> None:
    """Refuse an unknown --dataset before anything is loaded: "did you mean", and `folder:` for a path."""
    import difflib

    if spec.startswith("folder:") or spec in _REGISTRY:
        return
    hint = ""
    if "/" in spec or Path(spec).expanduser().exists():
        hint = f" (a folder of your own images is given as folder:{spec})"
    else:
        close = difflib.get_close_matches(spec.lower(), sorted(_REGISTRY), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CgilError(f"unknown dataset {spec!r}{hint}; choose one of: {', '.join(dataset_choices())}")


def get_dataset(spec: str, data_dir: Optional[str | Path] = None, val_split: Optional[float] = None,
                strict: bool = False) -> ImageDataset:
    """`val_split` (a fraction) and `strict` (abort on unreadable files) apply to `folder:` datasets."""
    check_dataset_name(spec)
    if spec.startswith("folder:"):
        from .folder import load_folder_dataset

        ds = load_folder_dataset(spec[len("folder:"):], val_split=val_split, strict=strict)
    else:
        if val_split is not None:
            raise CgilError(f"--val-split is for folder: datasets; {spec} has its own test split")
        ds = _REGISTRY[spec](Path(data_dir).expanduser() if data_dir else None)
    ds.check()
    return ds


# The paper's benchmarks (and CIFAR-100): each module registers its loader on import.
from . import cars196, cifar100, cub200, eurosat, imagenet_r, isic  # noqa: E402,F401

__all__ = ["ImageDataset", "Split", "get_dataset", "check_dataset_name", "dataset_choices", "register_dataset", "load_image", "to_rgb"]
