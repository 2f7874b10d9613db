"""Frozen CLIP image embeddings, computed once and cached on disk.

The cache key is (model, weights, dataset, split, classes of the task): rerunning a benchmark with
another method, seed of the learner or generator reuses the same features. Embeddings are stored
unnormalised, exactly as the image encoder returns them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .artifacts import load_tensors, save_tensors
from .clip import FrozenClip
from .data import ImageDataset, load_image

Progress = Optional[Callable[[int, int], None]]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CGIL_CACHE", Path.home() / ".cache" / "cgil"))


def cache_key(clip: FrozenClip, dataset: ImageDataset, split: str, classes: Sequence[int]) -> str:
    ident = {
        "model": clip.identity.model,
        "weights": clip.identity.weights_id,
        "config": clip.identity.config_sha,
        "dataset": dataset.dataset_id,
        "split": split,
        "classes": sorted(int(c) for c in classes),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def embed_items(clip: FrozenClip, items: Sequence, batch_size: int = 64, progress: Progress = None) -> torch.Tensor:
    """(N, D) float32 CPU embeddings of images given as paths, arrays or PIL images."""
    out = []
    for start in range(0, len(items), batch_size):
        batch = torch.stack([clip.preprocess(load_image(it)) for it in items[start:start + batch_size]])
        out.append(clip.encode_images(batch).cpu())
        if progress:
            progress(min(start + batch_size, len(items)), len(items))
    if not out:
        return torch.zeros(0, clip.identity.embed_dim)
    return torch.cat(out)


def task_features(
    clip: FrozenClip,
    dataset: ImageDataset,
    split: str,
    classes: Sequence[int],
    cache_dir: Optional[Path] = None,
    batch_size: int = 64,
    progress: Progress = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels (dataset class indices) of one split restricted to `classes`."""
    part = getattr(dataset, split).subset(classes)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "features" / f"{cache_key(clip, dataset, split, classes)}.safetensors"
        if path.exists():
            cached = load_tensors(path)
            if cached["labels"].shape[0] == len(part) and np.array_equal(cached["labels"].numpy(), part.labels):
                return cached["features"], cached["labels"]
    feats = embed_items(clip, part.items, batch_size, progress)
    labels = torch.from_numpy(part.labels.copy())
    if path is not None:
        save_tensors(path, {"features": feats, "labels": labels},
                     metadata={"model": clip.identity.model, "weights": clip.identity.weights_id,
                               "dataset": dataset.dataset_id, "split": split})
    return feats, labels
