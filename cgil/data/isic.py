"""ISIC 2018 Task 3 (HAM10000 dermoscopy; "Lesion Diagnosis") without the melanocytic-nevus class.

Files read (the challenge's distributed archives, extracted side by side):
  ISIC2018_Task3_Training_Input/ISIC_*.jpg
  ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
  ISIC2018_Task3_Test_Input/ISIC_*.jpg
  ISIC2018_Task3_Test_GroundTruth/ISIC2018_Task3_Test_GroundTruth.csv
Each CSV has one row per image: `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC` with a one-hot diagnosis.

Which classes, and why: the reference (seq-isic) has 6 classes, in this order: melanoma (MEL),
basal cell carcinoma (BCC), actinic keratosis or intraepithelial carcinoma (AKIEC), benign keratosis
(BKL), dermatofibroma (DF), vascular skin lesion (VASC): the seven ISIC 2018 diagnoses minus
melanocytic nevus (NV), in the CSV's column order. NV is two thirds of HAM10000 (6,705 of 10,015
training images, more than all other classes together); without it the six remaining classes split
evenly into 3 tasks of 2. The reference does not state the reason; the imbalance is our reading.
The reference names are used as class names.

Train/test: the official training set (3,310 images of the 6 classes) and the official test set
with its released ground truth (603 images of the 6 classes). The reference loads preprocessed
pickles whose provenance and split it does not document; this is the split a researcher would
expect from the official release, not one we could verify against the reference's files.
Reference budget for ISIC: 750 VAE passes, 150 alignment epochs at lr 0.05 (`--preset paper`).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from runtime.errors import CgilError
from . import register_dataset
from .base import ImageDataset, Split
from .catalog import Benchmark, benchmark_dataset, Download, locate_root, register_benchmark, require

CODES = ["MEL", "BCC", "AKIEC", "BKL", "DF", "VASC"]  # kept, in label order
DROPPED = ["NV"]
NAMES = ["melanoma", "basal cell carcinoma", "actinic keratosis or intraepithelial carcinoma",
         "benign keratosis", "dermatofibroma", "vascular skin lesion"]
_S3 = "https://isic-challenge-data.s3.amazonaws.com/2018/"
SPLITS = {
    "train": ("ISIC2018_Task3_Training_Input", "ISIC2018_Task3_Training_GroundTruth",
              "ISIC2018_Task3_Training_GroundTruth.csv"),
    "test": ("ISIC2018_Task3_Test_Input", "ISIC2018_Task3_Test_GroundTruth",
             "ISIC2018_Task3_Test_GroundTruth.csv"),
}

BENCH = register_benchmark(Benchmark(
    name="isic",
    title="ISIC 2018 Task 3 (6 classes, no nevus)",
    num_classes=6,
    task_sizes=(2,) * 3,
    how_to_get=("Get the ISIC 2018 Task 3 training and test images and ground truth "
                "(ISIC2018_Task3_{Training,Test}_{Input,GroundTruth}.zip) from https://challenge.isic-archive.com/data/#2018 "
                "and extract them into one folder."),
    layout="ISIC2018_Task3_{Training,Test}_Input/ and ISIC2018_Task3_{Training,Test}_GroundTruth/*.csv",
    downloads=tuple(Download(_S3 + f, f) for f in (
        "ISIC2018_Task3_Training_Input.zip", "ISIC2018_Task3_Training_GroundTruth.zip",
        "ISIC2018_Task3_Test_Input.zip", "ISIC2018_Task3_Test_GroundTruth.zip")),
    expected={"train": dict(zip(NAMES, [1113, 514, 327, 1099, 115, 142])),
              "test": dict(zip(NAMES, [171, 93, 43, 217, 44, 35]))},
))


def _ground_truth(root: Path, gt_dir: str, csv_name: str) -> Path:
    for cand in (root / gt_dir / csv_name, root / csv_name):
        if cand.is_file():
            return cand
    return require(BENCH, root / gt_dir / csv_name)


def _read_split(root: Path, split: str) -> tuple[list[str], list[int], Path]:
    img_dir, gt_dir, csv_name = SPLITS[split]
    gt = _ground_truth(root, gt_dir, csv_name)
    images = require(BENCH, root / img_dir, "folder")
    with open(gt, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["image", *CODES, *DROPPED]
    header = list(rows[0].keys()) if rows else []
    lacking = [c for c in need if c not in header]
    if lacking:
        raise CgilError(f"isic: {gt} lacks column(s) {', '.join(lacking)} (expected image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)")
    items, labels = [], []
    for n, row in enumerate(rows, 2):
        hot = [c for c in CODES + DROPPED if float(row[c] or 0) >= 0.5]
        if len(hot) != 1:
            raise CgilError(f"isic: {gt} line {n} ({row['image']}) does not have exactly one diagnosis")
        if hot[0] in DROPPED:
            continue
        items.append(str(images / f"{row['image']}.jpg"))
        labels.append(CODES.index(hot[0]))
    return items, labels, gt


@register_dataset("isic")
def load_isic(data_dir: Optional[Path]) -> ImageDataset:
    root = locate_root(BENCH, data_dir, [SPLITS["train"][1], SPLITS["train"][2], SPLITS["train"][0]],
                       ["isic", "ISIC2018"])
    tr_items, tr_labels, tr_gt = _read_split(root, "train")
    te_items, te_labels, te_gt = _read_split(root, "test")
    return benchmark_dataset(BENCH, root, "2018-task3-no-nv-v1", NAMES, Split(tr_items, tr_labels),
                             Split(te_items, te_labels), index_files=[tr_gt, te_gt],
                             protocol="ISIC 2018 Task 3 official train/test, NV dropped", codes=CODES)
