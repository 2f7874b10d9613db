"""A user's own images: PATH/train/<class>/* and PATH/test/<class>/*.

Class names come from folder names with underscores read as spaces, sorted for a stable order.
"""
from __future__ import annotations

from pathlib import Path

from runtime.errors import CgilError
from runtime.names import clean_names, folder_class_name
from .base import IMAGE_EXTENSIONS, ImageDataset, Split, fingerprint_files


def class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_folder_dataset(root: str | Path) -> ImageDataset:
    root = Path(root).expanduser().resolve()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise CgilError(f"folder dataset {root} has no '{split}/' directory (expected {root}/{split}/<class>/*)")
    train_dirs = class_dirs(root / "train")
    if not train_dirs:
        raise CgilError(f"folder dataset {root / 'train'} has no class folders")
    folder_names = [d.name for d in train_dirs]
    test_names = {d.name for d in class_dirs(root / "test")}
    missing = [n for n in folder_names if n not in test_names]
    if missing:
        raise CgilError(f"class folder(s) missing from {root / 'test'}: {', '.join(missing)}")
    extra = sorted(test_names - set(folder_names))
    if extra:
        raise CgilError(f"class folder(s) in {root / 'test'} but not in train: {', '.join(extra)}")

    splits, all_files = {}, []
    for split in ("train", "test"):
        items, labels = [], []
        for label, name in enumerate(folder_names):
            files = image_files(root / split / name)
            if not files:
                raise CgilError(f"empty class folder: {root / split / name} holds no images")
            items += [str(f) for f in files]
            labels += [label] * len(files)
        splits[split] = Split(items, labels)
        all_files += items
    return ImageDataset(
        name=f"folder:{root}",
        dataset_id=f"folder:{root}:{fingerprint_files(all_files, root)}",
        classnames=clean_names([folder_class_name(n) for n in folder_names], where=f"class folder in {root}"),
        train=splits["train"],
        test=splits["test"],
        meta={"folder_names": folder_names},
    )
