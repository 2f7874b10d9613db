"""Frozen CLIP image embeddings, computed once and cached on disk.

The cache key is (model, weights, dataset, split, classes of the task), plus, for features computed
on a GPU, the device, the card and its TF32 settings (CUDA's TF32 matmuls and convolutions change the
features' low bits, so CPU and GPU features are never mixed); CPU keys are unchanged. Rerunning a
benchmark with another method, seed of the learner or generator reuses the same features. Embeddings
are stored unnormalised, exactly as the image encoder returns them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import distributed
from cgil.tensor_io import load_tensors, save_tensors
from runtime.artifacts import cache_root
from runtime.images import LOADER_VERSION
from .clip import FrozenClip
from .data import ImageDataset, load_image

Progress = Optional[Callable[[int, int], None]]


def default_cache_dir() -> Path:
    """The feature cache: runtime.artifacts.cache_root(), the rule every cache of cgil follows."""
    return cache_root()


def device_facts(device: torch.device) -> dict:
    """What, besides the model, decides a GPU's features: the card and whether TF32 is on."""
    if device.type != "cuda":
        return {}
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), **tf32_settings()}


def tf32_settings() -> dict:
    """Whether CUDA matmuls and cuDNN convolutions may use TF32, read through torch's fp32_precision API
    (torch >= 2.9): once any fp32_precision is set, reading the legacy `allow_tf32` flags can raise.
    Setting a parent (global, cudnn) writes its value into the per-op settings read here; "none" means
    nothing was set through the new API, and only then is the legacy flag read (so on older torch too)."""
    b = torch.backends

    def resolve(holder, legacy) -> bool:
        value = getattr(holder, "fp32_precision", None)
        return value == "tf32" if value not in (None, "none") else bool(legacy())

    return {"tf32_matmul": resolve(b.cuda.matmul, lambda: b.cuda.matmul.allow_tf32),
            "tf32_cudnn": resolve(getattr(b.cudnn, "conv", None), lambda: b.cudnn.allow_tf32)}


def cache_key(clip: FrozenClip, dataset: ImageDataset, split: str, classes: Sequence[int],
              device: Optional[dict] = None) -> str:
    """`device`: the device facts to key on (default: those of clip.device, see device_facts)."""
    ident = {
        "model": clip.identity.model,
        "weights": clip.identity.weights_id,
        "config": clip.identity.config_sha,
        "dataset": dataset.dataset_id,
        "split": split,
        "loader": LOADER_VERSION,
        "classes": sorted(int(c) for c in classes),
        **(device_facts(clip.device) if device is None else device),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


class _Preprocessed(torch.utils.data.Dataset):
    def __init__(self, items: Sequence, preprocess: Callable):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_image(self.items[i]))


def loader_workers(device: torch.device) -> int:
    """Image-loading processes: none on the CPU (the encoder needs the cores), several for a GPU,
    which one process decoding and resizing images cannot keep busy."""
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _embed_local(clip: FrozenClip, items: Sequence, batch_size: int, progress: Progress,
                 scale: int = 1, total: Optional[int] = None, workers: Optional[int] = None) -> torch.Tensor:
    out = []
    total = len(items) if total is None else total
    workers = loader_workers(clip.device) if workers is None else workers
    # Same batches in the same order as a plain loop: the features do not depend on `workers`. The
    # loader gets a generator of its own: it draws a worker seed at every iteration, and from the
    # global RNG that draw would make a run that computes its features learn differently from one
    # that reads them from the cache (resume would no longer be bit for bit).
    batches = torch.utils.data.DataLoader(_Preprocessed(items, clip.preprocess), batch_size=batch_size,
                                          num_workers=workers, pin_memory=clip.device.type == "cuda",
                                          generator=torch.Generator())
    done = 0
    for batch in batches:
        out.append(clip.encode_images(batch).cpu())
        done += len(batch)
        if progress:
            progress(min(scale * done, total), total)
    if not out:
        return torch.zeros(0, clip.identity.embed_dim)
    return torch.cat(out)


def embed_items(clip: FrozenClip, items: Sequence, batch_size: int = 64, progress: Progress = None,
                workers: Optional[int] = None) -> torch.Tensor:
    """(N, D) float32 CPU embeddings of images given as paths, arrays or PIL images.

    Under torchrun (torch.distributed initialised, world size > 1) every rank embeds a contiguous
    shard of whole batches and the shards are gathered in order, so every rank returns exactly the
    tensor one process would compute. Only rank 0 reports progress (its shard, scaled to the total).
    """
    if not distributed.is_distributed():
        return _embed_local(clip, items, batch_size, progress, workers=workers)
    start, stop = distributed.batch_shard(len(items), batch_size)
    local = _embed_local(clip, items[start:stop], batch_size, progress if distributed.is_main() else None,
                         scale=distributed.world_size(), total=len(items), workers=workers)
    feats = distributed.all_gather_rows(local)
    if progress and distributed.is_main():
        progress(len(items), len(items))
    return feats


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
    # Under torchrun rank 0 alone reads and writes the cache; the others get its decision (and a
    # cached tensor) by broadcast, so ranks never disagree even without a shared file system.
    cached = _read_cache(path, part.labels) if distributed.is_main() else None
    if distributed.is_distributed():
        cached = distributed.broadcast(cached)
    if cached is not None:
        if progress:  # a full bar, not an empty "0/?" one, for a phase the cache answered
            progress(len(part.labels), len(part.labels))
        return cached
    feats = embed_items(clip, part.items, batch_size, progress)
    labels = torch.from_numpy(part.labels.copy())
    if path is not None and distributed.is_main():
        save_tensors(path, {"features": feats, "labels": labels},
                     metadata={"model": clip.identity.model, "weights": clip.identity.weights_id,
                               "dataset": dataset.dataset_id, "split": split})
    distributed.barrier()  # the cache file exists before any rank goes on
    return feats, labels


def _read_cache(path: Optional[Path], labels: np.ndarray) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if path is None or not path.exists():
        return None
    cached = load_tensors(path)
    if cached["labels"].shape[0] == len(labels) and np.array_equal(cached["labels"].numpy(), labels):
        return cached["features"], cached["labels"]
    return None
