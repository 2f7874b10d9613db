"""A user's own images: PATH/train/<class>/** and PATH/test/<class>/** (or PATH/val/<class>/**); PATH/train/
alone, or a flat PATH/<class>/** (ImageFolder's layout), gets a seeded, stratified test share held out
(--val-split, 20% by default, as ultralytics splits a folder without a validation set).

Class names come from folder names with underscores read as spaces, sorted for a stable order.
Images are found recursively under each class folder, as torchvision's ImageFolder does
(`train/<class>/batch1/*.jpg` counts for <class>); hidden folders are skipped. Every file's header
is read once up front: unreadable files (a macOS `._IMG_0001.jpg`, a truncated or oversized image)
are skipped with one warning that counts and lists them, or refused all at once with `strict`.
A class left with too few images is always refused, by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from runtime.errors import CgilError
from runtime.images import check_image
from runtime.names import clean_names, folder_class_name
from .base import IMAGE_EXTENSIONS, ImageDataset, Split, fingerprint_files

MIN_TRAIN_IMAGES = 2  # every generator needs two samples per class (BatchNorm, variances)
DEFAULT_VAL_SPLIT = 0.2  # the test share held out of a folder without test/ when --val-split is not given
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


def readable(files: list[Path], bad: list[tuple[Path, str]]) -> list[Path]:
    good = []
    for f in files:
        try:
            check_image(f)
            good.append(f)
        except CgilError as e:
            bad.append((f, reason(f, e)))
    return good


def report_unreadable(bad: list[tuple[Path, str]], root: Path, strict: bool = False,
                      warn: Optional[Callable[[str], None]] = None) -> None:
    """The one rule for unreadable files, for `train` and `update --data` alike: skipped with one warning
    that counts and lists them (once per process for the same files), or all refused at once with `strict`."""
    if bad and strict:
        raise CgilError(f"{len(bad)} unreadable image(s) in {root} (--strict): {_listing(bad, root)}")
    if bad and (warn is not None or _first_warning(root, bad)):
        (warn or _default_warn)(f"skipped {len(bad)} unreadable image(s) in {root} (--strict to abort instead): "
                                f"{_listing(bad, root)}")


def reason(path: Path, error: CgilError) -> str:
    """Why a file is unreadable, without its path: the listing names each file once, not twice."""
    why = str(error).split(f"{path}: ", 1)[-1]
    for form in (repr(str(path)), str(path)):  # Pillow's "cannot identify image file '/abs/path'"
        why = why.replace(form, "").strip()
    return why.removesuffix(" file") if why.startswith("cannot identify image") else why


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


@dataclass(frozen=True)
class Layout:
    """Where a folder dataset's classes are: `train` (PATH/train, or PATH itself for a flat PATH/<class>/*),
    `test` (PATH/test or PATH/val, None when held out) and the share of train held out (None with a test dir)."""

    root: Path
    train: Path
    test: Optional[Path]
    val_split: Optional[float]
    flat: bool = False


LAYOUTS = ("expected PATH/<class>/* (a test share is held out), PATH/train/<class>/* (likewise), "
           "or PATH/train/<class>/* with PATH/test/<class>/* (or PATH/val/<class>/*)")


def folder_layout(given: str | Path, val_split: Optional[float] = None) -> Layout:
    """Which layout a folder dataset has, checked before any image is read (cheap: directory listings only).

    PATH/train/ + PATH/test/ (or val/, ultralytics' name) is used as is. PATH/train/ alone, or class
    folders directly under PATH (ImageFolder's layout), gets a seeded, stratified test share held out:
    `val_split`, else DEFAULT_VAL_SPLIT, as ultralytics splits a folder that has no validation set.
    """
    root = Path(given).expanduser().resolve()
    if not root.is_dir():
        raise CgilError(f"folder dataset {given} does not exist ({LAYOUTS})")
    if val_split is not None and not 0 < val_split < 1:
        raise CgilError(f"--val-split must be a fraction between 0 and 1, got {val_split}")
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir():
        if test is not None:
            raise CgilError(f"folder dataset {root} has '{test.name}/' but no 'train/' directory "
                            f"(expected {root}/train/<class>/* next to {test}/<class>/*)")
        if not any(image_files_exist(d) for d in class_dirs(root)):
            raise CgilError(f"folder dataset {root} holds no class folders of images ({LAYOUTS})")
        return Layout(root, root, None, val_split or DEFAULT_VAL_SPLIT, flat=True)
    if test is not None and val_split is not None:
        raise CgilError(f"--val-split holds out part of train/, but {root} already has a '{test.name}/' directory; "
                        "drop --val-split to use it")
    return Layout(root, root / "train", test, None if test is not None else val_split or DEFAULT_VAL_SPLIT)


def image_files_exist(class_dir: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in class_dir.rglob("*"))


def load_folder_dataset(root: str | Path, val_split: Optional[float] = None, strict: bool = False,
                        warn: Optional[Callable[[str], None]] = None) -> ImageDataset:
    layout = folder_layout(root, val_split)
    root, val_split, has_test = layout.root, layout.val_split, layout.test is not None
    train_dirs = class_dirs(layout.train)
    if not train_dirs:
        raise CgilError(f"folder dataset {layout.train} has no class folders")
    folder_names = [d.name for d in train_dirs]
    if has_test:
        test_names = {d.name for d in class_dirs(layout.test)}
        missing = [n for n in folder_names if n not in test_names]
        if missing:
            raise CgilError(f"class folder(s) missing from {layout.test}: {', '.join(missing)}")
        extra = sorted(test_names - set(folder_names))
        if extra:
            raise CgilError(f"class folder(s) in {layout.test} but not in train: {', '.join(extra)}")

    bad: list[tuple[Path, str]] = []
    dirs = {"train": layout.train, **({"test": layout.test} if has_test else {})}
    files = {split: {name: readable(image_files(d / name), bad) for name in folder_names} for split, d in dirs.items()}
    report_unreadable(bad, root, strict, warn)
    need = MIN_TRAIN_IMAGES + (1 if not has_test else 0)
    few = [f"{n!r} ({len(files['train'][n])} in {layout.train / n})" for n in folder_names
           if len(files["train"][n]) < need]
    if few:
        what = "readable training image(s)" + ("" if has_test else " to hold one out for --val-split")
        raise CgilError(f"class(es) with too few {what}, each needs at least {need}: {', '.join(few)}")
    if has_test:
        empty = [n for n in folder_names if not files["test"][n]]
        if empty:
            raise CgilError("; ".join(f"empty class folder: {layout.test / n} holds no readable images "
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
        meta={"folder_names": folder_names, "root": str(root), "val_split": val_split, "flat": layout.flat,
              "held_out": None if has_test else f"{val_split:.0%} of each class held out as the test split",
              "skipped": [[str(p), why] for p, why in bad]},
    )


_WARNED: set[tuple] = set()  # (root, files) already reported by this process


def _first_warning(root: Path, bad: list[tuple[Path, str]]) -> bool:
    """Once per run, not once per method: `--method all` loads the same folder four times in one process."""
    key = (str(root), tuple(str(p) for p, _ in bad))
    if key in _WARNED:
        return False
    _WARNED.add(key)
    return True


def _default_warn(message: str) -> None:
    from runtime.console import warn

    warn(message)
