"""CUB-200-2011 from its distributed layout (CUB_200_2011/).

Files read: images.txt (id, relative path), image_class_labels.txt (id, class id 1..200),
train_test_split.txt (id, 1 = train / 0 = test), classes.txt (class id, "001.Black_footed_Albatross"),
images/<class folder>/<file>.jpg.

Protocol: the official train/test split (5,994 / 5,794 images); 10 tasks of 20 classes. Class
names: the official folder names without the numeric prefix, underscores read as spaces and lower
cased ("001.Black_footed_Albatross" -> "black footed albatross"), which is exactly the reference's
name list (seq-cub200), official spelling quirks included ("artic tern"). The reference loads a
preprocessed archive of the same dataset; that its split is the official one is our reading, not
something its archive lets us check.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from runtime.errors import CgilError
from . import register_dataset
from .base import ImageDataset, Split
from .catalog import Benchmark, benchmark_dataset, Download, locate_root, register_benchmark, require

BENCH = register_benchmark(Benchmark(
    name="cub200",
    title="CUB-200-2011",
    num_classes=200,
    task_sizes=(20,) * 10,
    how_to_get="Get CUB-200-2011 (CUB_200_2011.tgz) from https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it.",
    layout="CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/}",
    downloads=(Download("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011.tgz"),),
    expected={"train": 5994, "test": 5794},
))

META_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _table(path: Path, min_cols: int = 2) -> dict[int, str]:
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < min_cols:
            raise CgilError(f"cub200: {path} line {n} is not '<id> <value>': {line!r}")
        try:
            out[int(parts[0])] = parts[1].strip()
        except ValueError as e:
            raise CgilError(f"cub200: {path} line {n} does not start with an integer id: {line!r}") from e
    return out


def official_name(folder: str) -> str:
    """'001.Black_footed_Albatross' -> 'black footed albatross' (the reference's class name form)."""
    return re.sub(r"^\d+\.", "", folder).replace("_", " ").strip().lower()


@register_dataset("cub200")
def load_cub200(data_dir: Optional[Path]) -> ImageDataset:
    root = locate_root(BENCH, data_dir, ["images.txt"], ["CUB_200_2011"])
    paths = [require(BENCH, root / f) for f in META_FILES]
    require(BENCH, root / "images", "folder")
    images, labels, is_train, class_rows = (_table(p) for p in paths)
    class_ids = sorted(class_rows)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise CgilError(f"cub200: {paths[3]} should number classes 1..N without gaps")
    names = [official_name(class_rows[c]) for c in class_ids]
    for what, table, path in (("class label", labels, paths[1]), ("train/test flag", is_train, paths[2])):
        lacking = [i for i in images if i not in table]
        if lacking:
            raise CgilError(f"cub200: {path} has no {what} for {len(lacking)} image id(s) of images.txt "
                            f"(first: {lacking[0]}); the metadata files come from different releases")
    split = {"train": ([], []), "test": ([], [])}
    for img_id in sorted(images):
        flag = is_train[img_id]
        if flag not in ("0", "1"):
            raise CgilError(f"cub200: {paths[2]}: flag {flag!r} for image {img_id} is not 0 or 1")
        items, labs = split["train" if flag == "1" else "test"]
        items.append(str(root / "images" / images[img_id]))
        labs.append(int(labels[img_id]) - 1)
    return benchmark_dataset(BENCH, root, "official-split-v1", names, Split(*split["train"]), Split(*split["test"]),
                             index_files=paths, protocol="official train_test_split.txt")
