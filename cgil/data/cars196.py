"""Stanford Cars (Cars-196) from its annotation files, in either distributed layout.

1. The split release (also torchvision's layout): devkit/cars_meta.mat (class_names),
   devkit/cars_train_annos.mat (fname, class), cars_test_annos_withlabels.mat (fname, class; in the
   root or in devkit/), images in cars_train/ and cars_test/.
2. The all-in-one release: cars_annos.mat (relative_im_path, class, test flag, class_names) with
   the images in car_ims/.

Protocol: the official split, 8,144 train / 8,041 test images; class names as in the official
annotation file ("AM General Hummer SUV 2000"), which is also where the reference's names come from;
9 tasks of 20 classes and one of 16. Class ids in the .mat files are 1-based.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from runtime.errors import CgilError
from . import register_dataset
from .base import ImageDataset, Split
from .catalog import Benchmark, benchmark_dataset, locate_root, register_benchmark, require

BENCH = register_benchmark(Benchmark(
    name="cars196",
    title="Stanford Cars (Cars-196)",
    num_classes=196,
    task_sizes=(20,) * 9 + (16,),
    how_to_get=("Get Stanford Cars as released at https://ai.stanford.edu/~jkrause/cars/car_dataset.html (links there "
                "are often down; copies of the same files circulate): either cars_train.tgz, cars_test.tgz, car_devkit.tgz "
                "and cars_test_annos_withlabels.mat (torchvision's StanfordCars layout), or car_ims.tgz with cars_annos.mat."),
    layout=("devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/ "
            "(or cars_annos.mat with car_ims/)"),
    expected={"train": 8144, "test": 8041},
))


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # scipy comes with scikit-learn, a cgil dependency
        raise CgilError("cars196: reading the .mat annotation files needs scipy (pip install scipy)") from e
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises several types for a damaged file
        raise CgilError(f"cars196: cannot read {path}: {e}") from e


def _field(mat: dict[str, Any], path: Path, key: str) -> Any:
    if key not in mat:
        raise CgilError(f"cars196: {path} has no '{key}' entry; is it the official Stanford Cars annotation file?")
    return mat[key]


def _column(ann: Any, path: Path, name: str) -> list:
    ann = np.atleast_1d(ann)
    if ann.dtype.names is None or name not in ann.dtype.names:
        raise CgilError(f"cars196: annotations in {path} have no '{name}' field")
    return [v.item() if isinstance(v, np.ndarray) else v for v in ann[name]]


def _names(mat: dict[str, Any], path: Path) -> list[str]:
    return [str(n).strip() for n in np.atleast_1d(_field(mat, path, "class_names"))]


def _labels(values: list, path: Path, num_classes: int) -> list[int]:
    labels = [int(v) - 1 for v in values]
    if labels and (min(labels) < 0 or max(labels) >= num_classes):
        raise CgilError(f"cars196: {path} has class ids outside 1..{num_classes}")
    return labels


def _split_release(root: Path) -> tuple[list[str], dict[str, tuple[list[str], list[int]]], list[Path]]:
    meta = require(BENCH, root / "devkit" / "cars_meta.mat")
    train_annos = require(BENCH, root / "devkit" / "cars_train_annos.mat")
    test_annos = next((p for p in (root / "cars_test_annos_withlabels.mat",
                                   root / "devkit" / "cars_test_annos_withlabels.mat") if p.exists()), None)
    if test_annos is None:
        raise CgilError(f"cars196: missing file {root / 'cars_test_annos_withlabels.mat'} (the test labels, distributed "
                        "separately from devkit/cars_test_annos.mat, which has none). " + BENCH.how_to_get)
    names = _names(_loadmat(meta), meta)
    out = {}
    for split, path, folder in (("train", train_annos, "cars_train"), ("test", test_annos, "cars_test")):
        require(BENCH, root / folder, "folder")
        ann = _field(_loadmat(path), path, "annotations")
        files = [str(root / folder / str(f)) for f in _column(ann, path, "fname")]
        out[split] = (files, _labels(_column(ann, path, "class"), path, len(names)))
    return names, out, [meta, train_annos, test_annos]


def _all_in_one_release(root: Path) -> tuple[list[str], dict[str, tuple[list[str], list[int]]], list[Path]]:
    path = root / "cars_annos.mat"
    mat = _loadmat(path)
    names = _names(mat, path)
    ann = _field(mat, path, "annotations")
    files = [str(root / str(f)) for f in _column(ann, path, "relative_im_path")]
    labels = _labels(_column(ann, path, "class"), path, len(names))
    test = [int(v) for v in _column(ann, path, "test")]
    out = {s: ([f for f, t in zip(files, test) if t == flag], [l for l, t in zip(labels, test) if t == flag])
           for s, flag in (("train", 0), ("test", 1))}
    return names, out, [path]


@register_dataset("cars196")
def load_cars196(data_dir: Optional[Path]) -> ImageDataset:
    root = locate_root(BENCH, data_dir, ["devkit", "cars_annos.mat"], ["stanford_cars", "stanford-cars", "cars196"])
    if (root / "devkit").is_dir():
        names, splits, meta_files = _split_release(root)
        protocol = "official split (cars_train_annos.mat / cars_test_annos_withlabels.mat)"
    else:
        names, splits, meta_files = _all_in_one_release(root)
        protocol = "official split (cars_annos.mat test flag)"
    return benchmark_dataset(BENCH, root, "official-split-v1", names, Split(*splits["train"]), Split(*splits["test"]),
                             index_files=meta_files, protocol=protocol)
