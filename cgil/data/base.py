"""What a dataset is to cgil: class names plus train/test lists of images and labels.

An item is either a file path (read lazily) or an in-memory image (uint8 array or PIL image).
`dataset_id` must change whenever the images could have changed: it keys the feature cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from runtime.errors import CgilError
from runtime.images import IMAGE_EXTENSIONS, load_image, to_rgb  # noqa: F401  (re-exported for the loaders)


@dataclass
class Split:
    items: list[Any]
    labels: np.ndarray  # int64, one per item, indices into ImageDataset.classnames

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.items) != len(self.labels):
            raise ValueError("items and labels differ in length")

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, classes: Sequence[int]) -> "Split":
        keep = np.flatnonzero(np.isin(self.labels, np.asarray(list(classes))))
        return Split([self.items[i] for i in keep], self.labels[keep])


@dataclass
class ImageDataset:
    name: str
    dataset_id: str
    classnames: list[str]
    train: Split
    test: Split
    # Reference task sizes (e.g. [2]*5 for digits, [20]*9+[16] for Cars-196); None: split evenly.
    task_sizes: Optional[list[int]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def check(self) -> None:
        """Every class must have training and test images (the learner needs both)."""
        for split_name, split in (("train", self.train), ("test", self.test)):
            counts = np.bincount(split.labels, minlength=self.num_classes)
            empty = [self.classnames[c] for c in np.flatnonzero(counts == 0)]
            if empty:
                raise CgilError(f"{self.name}: no {split_name} images for class(es): {', '.join(empty)}")

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class name in each split (recorded in config.json and printed by train)."""
        return {split: {name: int(n) for name, n in zip(self.classnames, np.bincount(
            getattr(self, split).labels, minlength=self.num_classes))} for split in ("train", "test")}


def fingerprint_files(paths: Sequence[str | Path], root: Path) -> str:
    """Cheap content fingerprint: relative path, size and mtime of every file."""
    h = hashlib.sha256()
    for p in sorted(map(Path, paths)):
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
