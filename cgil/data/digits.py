"""scikit-learn's bundled handwritten digits: the offline default benchmark.

1,797 real 8x8 grayscale digits, 10 classes, a fixed stratified 70/30 split, 5 tasks of 2.
"""
from __future__ import annotations

import numpy as np

from .base import ImageDataset, Split

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_SEED = 0  # fixed: the split is part of the benchmark, not of the experiment seed


DATASET_ID = "sklearn-digits-v1-split70-30-seed0"


def load_digits_dataset() -> ImageDataset:
    images, target, tr, te = digits_arrays()
    return ImageDataset(
        name="digits",
        dataset_id=DATASET_ID,
        classnames=list(DIGIT_NAMES),
        train=Split([images[i] for i in tr], target[tr]),
        test=Split([images[i] for i in te], target[te]),
        task_sizes=[2] * 5,
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(8-bit images, labels, train indices, test indices), kept in the cgil cache after the first load:
    importing scikit-learn costs ~1 CPU-s, a fixed cost of every digits run that the arrays do not need."""
    import io

    from runtime.artifacts import atomic_write_bytes
    from ..features import default_cache_dir

    path = default_cache_dir() / "datasets" / f"{DATASET_ID}.npz"
    try:
        with np.load(path) as z:
            return z["images"], z["target"], z["train"], z["test"]
    except (OSError, KeyError, ValueError):  # absent or unreadable: load from scikit-learn and write it again
        pass
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0 * 255.0).round().astype(np.uint8)  # 0..16 ink levels -> 8-bit gray
    # White digit on black, as stored. Each item is an (8, 8) uint8 array; load_image makes it RGB.
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.3, stratify=bunch.target, random_state=SPLIT_SEED)
    arrays = images, np.asarray(bunch.target), np.sort(tr), np.sort(te)
    buf = io.BytesIO()
    np.savez(buf, images=arrays[0], target=arrays[1], train=arrays[2], test=arrays[3])
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:  # a read-only cache costs the import next time, nothing else
        pass
    return arrays
