"""CIFAR-100 from its official python pickles (cifar-100-python/{meta,train,test}).

Protocol: the official 50,000 / 10,000 train/test split, the 100 fine labels with their official
names (underscores read as spaces), 10 tasks of 10 classes. CIFAR-100 is not one of the CGIL
paper's benchmarks; it is the usual class-incremental benchmark (seq-cifar100 in the reference
framework uses the same split and label indices), so there is no `--preset paper` for it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np

from runtime.errors import CgilError
from . import register_dataset
from .base import ImageDataset, Split, fingerprint_files
from .catalog import Benchmark, Download, locate_root, register_benchmark, require

BENCH = register_benchmark(Benchmark(
    name="cifar100",
    title="CIFAR-100",
    num_classes=100,
    task_sizes=(10,) * 10,
    how_to_get="Get CIFAR-100 (python version, cifar-100-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html and extract it.",
    layout="cifar-100-python/{meta,train,test} (python pickles)",
    downloads=(Download("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz"),),
    expected={"train": {"*": 500}, "test": {"*": 100}},
))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise CgilError(f"cifar100: cannot read {path}: {e}. It should be the official python pickle; "
                        "re-extract cifar-100-python.tar.gz") from e


def _split(path: Path, num_classes: int) -> Split:
    d = _unpickle(path)
    for key in ("data", "fine_labels"):
        if key not in d:
            raise CgilError(f"cifar100: {path} has no '{key}' entry; is it the official CIFAR-100 python pickle?")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CgilError(f"cifar100: {path} holds data of shape {data.shape}, expected (N, 3072)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC uint8, as PIL wants it
    labels = np.asarray(d["fine_labels"], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CgilError(f"cifar100: {path} has fine labels outside 0..{num_classes - 1}")
    return Split([images[i] for i in range(len(images))], labels)


@register_dataset("cifar100")
def load_cifar100(data_dir: Optional[Path]) -> ImageDataset:
    root = locate_root(BENCH, data_dir, ["meta"], ["cifar-100-python"])
    files = [require(BENCH, root / n) for n in ("meta", "train", "test")]
    meta = _unpickle(files[0])
    if "fine_label_names" not in meta:
        raise CgilError(f"cifar100: {files[0]} has no 'fine_label_names'; is it the official CIFAR-100 meta file?")
    names = [str(n).replace("_", " ") for n in meta["fine_label_names"]]
    return ImageDataset(
        name="cifar100",
        dataset_id=f"cifar100:official-v1:{fingerprint_files(files, root)}",
        classnames=names,
        train=_split(files[1], len(names)),
        test=_split(files[2], len(names)),
        task_sizes=list(BENCH.task_sizes),
        meta={"root": str(root), "protocol": "official train/test pickles"},
    )
