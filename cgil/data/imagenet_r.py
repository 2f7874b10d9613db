"""ImageNet-R (Hendrycks et al. 2021) from its distributed layout: imagenet-r/<wnid>/<file>.jpg.

Protocol (the reference's seq-imagenet-r): the 30,000 renditions of 200 ImageNet classes are split
by a fixed list shipped with the reference (imagenet-r_train.yaml / imagenet-r_test.yaml, the
80/20 split introduced by CODA-Prompt): 24,000 train and 6,000 test images. We ship the test list
as package data (`imagenet_r_test.txt`, one `<wnid>/<file>` per line); the train split is every
other image of the 200 class folders, which is how the reference's train list is built (its 24,000
entries are the complement of the 6,000 test entries).

Labels are the reference's label indices (its wnid -> target mapping, which is a directory-listing
order, not sorted wnids), so that the reference's seeded class permutation yields the reference's
tasks; `imagenet_r_classes.tsv` lists, per label, the wnid and the class name. The mapping was read
off the reference's (path, target) pairs: 1,300 of them, all consistent. Class names: the
ImageNet-R names commonly used for CLIP zero-shot evaluation ("goldfish", "great white shark",
"hammerhead", ...). The reference reads its names from a pickle (label_to_class_name.pkl) that we
could not read; a few names may be spelled differently there. 10 tasks of 20 classes.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Optional

from runtime.errors import CgilError
from . import register_dataset
from .base import IMAGE_EXTENSIONS, ImageDataset, Split
from .catalog import Benchmark, benchmark_dataset, Download, locate_root, missing_files, register_benchmark

_HERE = Path(__file__).parent
SPLIT_FILE = _HERE / "imagenet_r_test.txt"
CLASSES_FILE = _HERE / "imagenet_r_classes.tsv"

BENCH = register_benchmark(Benchmark(
    name="imagenet-r",
    title="ImageNet-R",
    num_classes=200,
    task_sizes=(20,) * 10,
    how_to_get="Get ImageNet-R (imagenet-r.tar, 30,000 images) from https://github.com/hendrycks/imagenet-r and extract it.",
    layout="imagenet-r/<wnid>/<image>.jpg for the 200 wnids",
    downloads=(Download("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", "imagenet-r.tar"),),
    expected={"train": 24000, "test": 6000},
    notes="train/test: the reference's fixed 80/20 split (test list shipped as cgil/data/imagenet_r_test.txt)",
))


@lru_cache(maxsize=1)
def classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, names) in the reference's label order."""
    wnids, names = [], []
    for line in CLASSES_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            w, n = line.split("\t")
            wnids.append(w)
            names.append(n)
    return tuple(wnids), tuple(names)


@lru_cache(maxsize=1)
def reference_test_list() -> tuple[str, ...]:
    if not SPLIT_FILE.exists():
        raise CgilError(f"imagenet-r: the shipped split file {SPLIT_FILE} is missing from the installation; reinstall cgil")
    return tuple(ln.strip() for ln in SPLIT_FILE.read_text().splitlines() if ln.strip() and not ln.startswith("#"))


@register_dataset("imagenet-r")
def load_imagenet_r(data_dir: Optional[Path], test_list: Optional[list[str]] = None) -> ImageDataset:
    """`test_list` (entries `<wnid>/<file>`) replaces the shipped reference list; tests use it."""
    wnids, names = classes()
    root = locate_root(BENCH, data_dir, [wnids[0]], ["imagenet-r"])
    absent = [w for w in wnids if not (root / w).is_dir()]
    if absent:
        shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise CgilError(f"imagenet-r: incomplete copy in {root}: {len(absent)} of the 200 class folders missing "
                        f"({shown}). {BENCH.how_to_get}")
    label_of = {w: i for i, w in enumerate(wnids)}
    test_entries = list(test_list) if test_list is not None else list(reference_test_list())
    bad = [e for e in test_entries if e.split("/", 1)[0] not in label_of]
    if bad:
        raise CgilError(f"imagenet-r: split entries outside the 200 classes: {', '.join(bad[:3])}")
    missing_files(BENCH, [root / e for e in test_entries], "test image")
    test_set = set(test_entries)

    train_items, train_labels = [], []
    for w in wnids:
        for p in sorted((root / w).iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and f"{w}/{p.name}" not in test_set:
                train_items.append(str(p))
                train_labels.append(label_of[w])
    test_sorted = sorted(test_entries)
    split_id = "ref-v1" if test_list is None else hashlib.sha256("\n".join(test_sorted).encode()).hexdigest()[:12]
    test_items = [str(root / e) for e in test_sorted]
    test_labels = [label_of[e.split("/", 1)[0]] for e in test_sorted]
    return benchmark_dataset(BENCH, root, f"split-{split_id}", names, Split(train_items, train_labels),
                             Split(test_items, test_labels), check_files=False,
                             protocol="reference fixed 80/20 split", wnids=list(wnids))
