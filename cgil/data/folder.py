"""A user's own images: PATH/train/<class>/** and PATH/test/<class>/** (or a held-out share of train/).

Class names come from folder names with underscores read as spaces, sorted for a stable order.
Images are found recursively under each class folder, as torchvision's ImageFolder does
(`train/<class>/batch1/*.jpg` counts for <class>); hidden folders are skipped. Every file's header
is read once up front: unreadable files (a macOS `._IMG_0001.jpg`, a truncated or oversized image)
are skipped with one warning that counts and lists them, or refused all at once with `strict`.
A class left with too few images is always refused, by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from runtime.errors import CgilError
from runtime.images import check_image
from runtime.names import clean_names, folder_class_name
from .base import IMAGE_EXTENSIONS, ImageDataset, Split, fingerprint_files

MIN_TRAIN_IMAGES = 2  # every generator needs two samples per class (BatchNorm, variances)
VAL_SPLIT_SEED = 0  # the held-out split is fixed for a folder, whatever the learner's --seed
SHOWN = 10  # unreadable files listed by name in one message


def class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path) -> list[Path]:
    """Image files anywhere under `class_dir` (hidden sub-folders excluded), sorted by path."""
    found = []
    for p in class_dir.rglob("*"):
        rel = p.relative_to(class_dir).parts
        if any(part.startswith(".") for part in rel[:-1]):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(p)
    return sorted(found)


def _readable(files: list[Path], bad: list[tuple[Path, str]]) -> list[Path]:
    good = []
    for f in files:
        try:
            check_image(f)
            good.append(f)
        except CgilError as e:
            bad.append((f, str(e).split(": ", 1)[-1]))
    return good


def _listing(bad: list[tuple[Path, str]], root: Path) -> str:
    shown = "; ".join(f"{p.relative_to(root)} ({why})" for p, why in bad[:SHOWN])
    return shown + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")


def held_out(counts: dict[str, int], fraction: float) -> dict[str, np.ndarray]:
    """Per class, the indices (into its sorted files) that go to the test split: seeded and stratified."""
    out = {}
    for name, n in counts.items():
        k = min(max(1, int(round(fraction * n))), n - MIN_TRAIN_IMAGES)
        perm = np.random.default_rng([VAL_SPLIT_SEED, n]).permutation(n)
        out[name] = np.sort(perm[:k])
    return out


def load_folder_dataset(root: str | Path, val_split: Optional[float] = None, strict: bool = False,
                        warn: Optional[Callable[[str], None]] = None) -> ImageDataset:
    given = str(root)
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CgilError(f"folder dataset {given} does not exist (expected {given}/train/<class>/*)")
    if not (root / "train").is_dir():
        raise CgilError(f"folder dataset {root} has no 'train/' directory (expected {root}/train/<class>/*)")
    has_test = (root / "test").is_dir()
    if val_split is not None and not 0 < val_split < 1:
        raise CgilError(f"--val-split must be a fraction between 0 and 1, got {val_split}")
    if has_test and val_split is not None:
        raise CgilError(f"--val-split holds out part of train/, but {root} already has a 'test/' directory; "
                        "drop --val-split to use it")
    if not has_test and val_split is None:
        raise CgilError(f"folder dataset {root} has no 'test/' directory (expected {root}/test/<class>/*); "
                        "or pass --val-split 0.2 to hold out 20% of each class of train/")
    train_dirs = class_dirs(root / "train")
    if not train_dirs:
        raise CgilError(f"folder dataset {root / 'train'} has no class folders")
    folder_names = [d.name for d in train_dirs]
    if has_test:
        test_names = {d.name for d in class_dirs(root / "test")}
        missing = [n for n in folder_names if n not in test_names]
        if missing:
            raise CgilError(f"class folder(s) missing from {root / 'test'}: {', '.join(missing)}")
        extra = sorted(test_names - set(folder_names))
        if extra:
            raise CgilError(f"class folder(s) in {root / 'test'} but not in train: {', '.join(extra)}")

    bad: list[tuple[Path, str]] = []
    files = {split: {name: _readable(image_files(root / split / name), bad) for name in folder_names}
             for split in (("train", "test") if has_test else ("train",))}
    if bad and strict:
        raise CgilError(f"{len(bad)} unreadable image(s) in {root} (--strict): {_listing(bad, root)}")
    if bad:
        (warn or _default_warn)(f"skipped {len(bad)} unreadable image(s) in {root} (--strict to abort instead): "
                                f"{_listing(bad, root)}")
    need = MIN_TRAIN_IMAGES + (1 if not has_test else 0)
    few = [f"{n!r} ({len(files['train'][n])} in {root / 'train' / n})" for n in folder_names
           if len(files["train"][n]) < need]
    if few:
        what = "readable training image(s)" + ("" if has_test else " to hold one out for --val-split")
        raise CgilError(f"class(es) with too few {what}, each needs at least {need}: {', '.join(few)}")
    if has_test:
        empty = [n for n in folder_names if not files["test"][n]]
        if empty:
            raise CgilError("; ".join(f"empty class folder: {root / 'test' / n} holds no readable images "
                                      f"(class {n!r})" for n in empty))
    else:
        chosen = held_out({n: len(files["train"][n]) for n in folder_names}, val_split)
        files["test"] = {n: [files["train"][n][i] for i in chosen[n]] for n in folder_names}
        files["train"] = {n: [f for i, f in enumerate(files["train"][n]) if i not in set(chosen[n])]
                          for n in folder_names}

    splits, all_files = {}, []
    for split in ("train", "test"):
        items, labels = [], []
        for label, name in enumerate(folder_names):
            items += [str(f) for f in files[split][name]]
            labels += [label] * len(files[split][name])
        splits[split] = Split(items, labels)
        all_files += items
    tag = f":val={val_split}" if val_split is not None else ""
    return ImageDataset(
        name=f"folder:{root}",
        dataset_id=f"folder:{root}{tag}:{fingerprint_files(sorted(set(all_files)), root)}",
        classnames=clean_names([folder_class_name(n) for n in folder_names], where=f"class folder in {root}"),
        train=splits["train"],
        test=splits["test"],
        meta={"folder_names": folder_names, "root": str(root), "val_split": val_split,
              "skipped": [[str(p), why] for p, why in bad]},
    )


def _default_warn(message: str) -> None:
    from runtime.console import warn

    warn(message)
