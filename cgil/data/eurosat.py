"""EuroSAT-RGB from its distributed layout: EuroSAT_RGB/<Class>/<Class>_<n>.jpg (27,000 64x64 images).

Protocol (the reference's seq-eurosat-rgb): the train/val/test split of CoOp (Zhou et al.,
"split_zhou_EuroSAT.json": 13,500 / 5,400 / 8,100 images, 50/20/30 per class); training uses
"train", evaluation uses "test", "val" is unused. Class names are CoOp's ("Annual Crop Land",
"Highway or Road", ...), which the reference reads from that file. 5 tasks of 2 classes.

Put split_zhou_EuroSAT.json (from CoOp's DATASETS.md) next to the class folders or in --data-dir
to use the exact reference split. Without it we build a split with the same proportions, per class,
from the sorted file names shuffled by a fixed seed; it is NOT the reference's split (whose
assignment came from an unseeded listing order and cannot be regenerated), and the run records which
one was used (`meta["split"]`, and in the dataset id that keys the feature cache).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from runtime.errors import CgilError
from . import register_dataset
from .base import IMAGE_EXTENSIONS, ImageDataset, Split
from .catalog import Benchmark, benchmark_dataset, Download, locate_root, register_benchmark

FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
           "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
NAMES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
         "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
PER_CLASS = [3000, 3000, 3000, 2500, 2500, 2000, 2500, 3000, 2500, 3000]
SPLIT_FILES = ("split_zhou_EuroSAT.json", "split.json")  # CoOp's name, and the name the reference saves it under
FALLBACK_SEED = 0
P_TRAIN, P_VAL = 0.5, 0.2


def _counts(n: int) -> tuple[int, int, int]:
    """CoOp's per-class sizes: round(50%) train, round(20%) val, the rest test."""
    tr, va = round(n * P_TRAIN), round(n * P_VAL)
    return tr, va, n - tr - va


BENCH = register_benchmark(Benchmark(
    name="eurosat-rgb",
    title="EuroSAT-RGB",
    num_classes=10,
    task_sizes=(2,) * 5,
    how_to_get=("Get EuroSAT RGB (EuroSAT_RGB.zip, 27,000 images) from https://zenodo.org/records/7711810 and extract it; "
                "for the reference split also put CoOp's split_zhou_EuroSAT.json "
                "(https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) next to the class folders."),
    layout="EuroSAT_RGB/<Class>/<Class>_<n>.jpg for " + ", ".join(FOLDERS) + " [+ split_zhou_EuroSAT.json]",
    downloads=(Download("https://zenodo.org/records/7711810/files/EuroSAT_RGB.zip?download=1", "EuroSAT_RGB.zip"),),
    expected={"train": {n: _counts(c)[0] for n, c in zip(NAMES, PER_CLASS)},
              "test": {n: _counts(c)[2] for n, c in zip(NAMES, PER_CLASS)}},
))


def _split_file(root: Path, data_dir: Optional[Path]) -> Optional[Path]:
    for folder in dict.fromkeys([root, root.parent, *([Path(data_dir).expanduser()] if data_dir else [])]):
        for name in SPLIT_FILES:
            if (folder / name).is_file():
                return (folder / name).resolve()
    return None


def _from_split_file(root: Path, path: Path) -> dict[str, tuple[list[str], list[int]]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CgilError(f"eurosat-rgb: cannot read split file {path}: {e}") from e
    out = {}
    for split in ("train", "test"):
        if split not in data:
            raise CgilError(f"eurosat-rgb: split file {path} has no '{split}' list")
        items, labels = [], []
        for entry in data[split]:
            rel = str(entry[0]).lstrip("/")
            folder = rel.split("/", 1)[0]
            if folder not in FOLDERS:
                raise CgilError(f"eurosat-rgb: split file {path} names an image outside the 10 class folders: {rel}")
            items.append(str(root / rel))
            labels.append(FOLDERS.index(folder))
        out[split] = (items, labels)
    return out


def _fallback_split(root: Path) -> dict[str, tuple[list[str], list[int]]]:
    out = {"train": ([], []), "test": ([], [])}
    for label, folder in enumerate(FOLDERS):
        files = sorted(p.name for p in (root / folder).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise CgilError(f"eurosat-rgb: empty class folder {root / folder}. {BENCH.how_to_get}")
        perm = np.random.RandomState(FALLBACK_SEED + label).permutation(len(files))
        n_tr, n_va, _ = _counts(len(files))
        for split, idx in (("train", perm[:n_tr]), ("test", perm[n_tr + n_va:])):
            out[split][0].extend(str(root / folder / files[i]) for i in sorted(idx))
            out[split][1].extend([label] * len(idx))
    return out


@register_dataset("eurosat-rgb")
def load_eurosat_rgb(data_dir: Optional[Path]) -> ImageDataset:
    root = locate_root(BENCH, data_dir, [FOLDERS[0]], ["EuroSAT_RGB", "2750", "eurosat"])
    absent = [f for f in FOLDERS if not (root / f).is_dir()]
    if absent:
        raise CgilError(f"eurosat-rgb: incomplete copy in {root}: missing class folder(s) {', '.join(absent)}. "
                        f"{BENCH.how_to_get}")
    split_path = _split_file(root, data_dir)
    if split_path is not None:
        splits, split_tag = _from_split_file(root, split_path), "coop-split-file"
        extra = [split_path]
    else:
        splits, split_tag = _fallback_split(root), f"fallback-seed{FALLBACK_SEED}"
        extra = []
    return benchmark_dataset(BENCH, root, split_tag, NAMES, Split(*splits["train"]), Split(*splits["test"]),
                             index_files=extra, fingerprint_root=root.parent, split=split_tag,
                             split_file=str(split_path) if split_path else None)
