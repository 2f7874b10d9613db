"""The paper's benchmarks: where their files are expected, how to get them, and what a complete copy holds.

Each benchmark module (cifar100, imagenet_r, cub200, cars196, eurosat, isic) reads the dataset's
official on-disk layout; this module holds what they share: locating the root under `--data-dir`,
errors that name the missing piece and how to obtain it, and the expected counts that
`cgil data check` compares against.

`--data-dir` may point at the dataset's own folder or at a folder that holds it under its
distributed name (e.g. DIR/CUB_200_2011/images.txt or DIR/images.txt). Without `--data-dir` the
default is `$CGIL_DATA/<name>` (CGIL_DATA defaults to ~/.cache/cgil/datasets).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from runtime.errors import CgilError

if TYPE_CHECKING:
    from .base import ImageDataset, Split

Expected = Union[int, dict[str, int], None]  # a split's total, or per-class counts, or unknown


@dataclass(frozen=True)
class Download:
    url: str
    filename: str
    extract_to: str = "."  # relative to --data-dir


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    num_classes: int
    task_sizes: tuple[int, ...]
    how_to_get: str  # one or two sentences naming the release and where it comes from
    layout: str  # the files the loader reads, relative to the dataset root
    downloads: tuple[Download, ...] = ()
    expected: dict[str, Expected] = field(default_factory=dict)  # "train"/"test" -> Expected
    notes: str = ""


def data_home() -> Path:
    return Path(os.environ.get("CGIL_DATA", Path.home() / ".cache" / "cgil" / "datasets")).expanduser()


def default_root(name: str) -> Path:
    return data_home() / name


def get_hint(bench: Benchmark) -> str:
    auto = f" or run `cgil data download {bench.name} --data-dir DIR`" if bench.downloads else ""
    return f"{bench.how_to_get} Expected layout: {bench.layout}. Then pass --data-dir DIR{auto}."


def locate_root(bench: Benchmark, data_dir: Optional[Path], markers: Sequence[str],
                subdirs: Sequence[str] = ()) -> Path:
    """The first of DIR, DIR/<subdir>... that holds any of `markers`; a CgilError naming what is missing otherwise."""
    base = Path(data_dir).expanduser() if data_dir is not None else default_root(bench.name)
    if not base.exists():
        where = f"--data-dir {base}" if data_dir is not None else f"default data folder {base} (no --data-dir given)"
        raise CgilError(f"{bench.name}: {where} does not exist. {get_hint(bench)}")
    for cand in [base, *(base / s for s in subdirs)]:
        if any((cand / m).exists() for m in markers):
            return cand.resolve()
    looked = ", ".join(str(base / s / markers[0]) if s else str(base / markers[0]) for s in ["", *subdirs])
    raise CgilError(f"{bench.name}: cannot find {markers[0]} (looked for {looked}). {get_hint(bench)}")


def require(bench: Benchmark, path: Path, what: str = "file") -> Path:
    if not path.exists():
        raise CgilError(f"{bench.name}: missing {what} {path}. {get_hint(bench)}")
    return path


def missing_files(bench: Benchmark, paths: Sequence[Path], what: str = "image") -> None:
    """One error for every listed file that is absent: how many, and the first few by name."""
    gone = [p for p in paths if not p.is_file()]
    if gone:
        shown = ", ".join(str(p) for p in gone[:3]) + (", ..." if len(gone) > 3 else "")
        raise CgilError(f"{bench.name}: incomplete copy, {len(gone)} of {len(paths)} {what} file(s) missing "
                        f"({shown}). {get_hint(bench)}")


def benchmark_dataset(bench: Benchmark, root: Path, split_tag: str, classnames: Sequence[str], train: "Split",
                      test: "Split", index_files: Sequence[Path] = (), fingerprint_root: Optional[Path] = None,
                      check_files: bool = True, **meta: Any) -> "ImageDataset":
    """A benchmark's ImageDataset: every image present, and an id that changes with the files (the cache key).

    dataset_id = "<name>:<split tag>:<fingerprint of the index files and every image>".
    """
    from .base import ImageDataset, fingerprint_files

    images = [Path(p) for p in list(train.items) + list(test.items)]
    if check_files:
        missing_files(bench, images)
    fingerprint = fingerprint_files(list(index_files) + images, fingerprint_root or root)
    return ImageDataset(
        name=bench.name,
        dataset_id=f"{bench.name}:{split_tag}:{fingerprint}",
        classnames=list(classnames),
        train=train,
        test=test,
        task_sizes=list(bench.task_sizes),
        meta={"root": str(root), **meta},
    )


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(bench: Benchmark) -> Benchmark:
    BENCHMARKS[bench.name] = bench
    return bench
