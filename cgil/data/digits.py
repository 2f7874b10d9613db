"""scikit-learn's bundled handwritten digits: the offline default benchmark.

1,797 real 8x8 grayscale digits, 10 classes, a fixed stratified 70/30 split, 5 tasks of 2.
"""
from __future__ import annotations

import numpy as np

from .base import ImageDataset, Split

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_SEED = 0  # fixed: the split is part of the benchmark, not of the experiment seed


def load_digits_dataset() -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0 * 255.0).round().astype(np.uint8)  # 0..16 ink levels -> 8-bit gray
    # White digit on black, as stored. Each item is an (8, 8) uint8 array; load_image makes it RGB.
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.3, stratify=bunch.target, random_state=SPLIT_SEED)
    tr, te = np.sort(tr), np.sort(te)
    return ImageDataset(
        name="digits",
        dataset_id="sklearn-digits-v1-split70-30-seed0",
        classnames=list(DIGIT_NAMES),
        train=Split([images[i] for i in tr], bunch.target[tr]),
        test=Split([images[i] for i in te], bunch.target[te]),
        task_sizes=[2] * 5,
    )
