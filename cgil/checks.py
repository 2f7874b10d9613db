"""Checks of `cgil train` arguments that need no torch: run before anything heavy is imported or scanned.

A wrong flag costs the user a second, not the torch import and a dataset scan (issue 17, item 15). The
paths typed are made absolute here too, so that a run can be resumed from any directory (item 11).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from runtime.errors import CgilError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
# What a checkpoint file starts with: a zip archive (torch.save since 1.6, .npz), a pickle (older torch.save).
# A safetensors file starts with its 8-byte header length, then '{'.
_BINARY_STARTS = (b"PK\x03\x04", b"\x80")


def looks_like_path(pretrained: str) -> bool:
    """An open_clip tag is a bare word (openai, laion2b_s34b_b79k); anything path-like names a file."""
    return Path(pretrained).suffix in CHECKPOINT_SUFFIXES or "/" in pretrained or Path(pretrained).expanduser().exists()


def check_pretrained(pretrained: Optional[str]) -> None:
    """Refuse a --pretrained file that is missing, a folder, empty or text, naming it; tags pass through."""
    if pretrained is None or pretrained in ("", "none", "random") or not looks_like_path(pretrained):
        return
    path = Path(pretrained).expanduser()
    if not path.exists():
        raise CgilError(f"--pretrained {pretrained}: no such checkpoint file")
    if not path.is_file():
        raise CgilError(f"--pretrained {pretrained} is a directory; give the checkpoint file inside it")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CgilError(f"--pretrained {pretrained}: the file is empty, not a checkpoint")
    safetensors = len(head) > 8 and head[8:9] == b"{"
    if not safetensors and not head.startswith(_BINARY_STARTS) and _is_text(head):
        raise CgilError(f"--pretrained {pretrained} is a text file, not a checkpoint: give an open_clip checkpoint "
                        "or a file written by torch.save(model.state_dict())")


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4  # only a multi-byte character cut at the end of the sample
    return True


def check_numbers(values: dict) -> None:
    """Counts and rates a run cannot use, refused by flag before the run starts."""
    for flag in ("tasks", "epochs", "passes"):
        if values.get(flag) is not None and values[flag] < 1:
            raise CgilError(f"--{flag} must be at least 1, got {values[flag]}")
    if values.get("lr") is not None and not values["lr"] > 0:
        raise CgilError(f"--lr must be positive, got {values['lr']}")
    split = values.get("val_split")
    if split is not None and not 0 < split < 1:
        raise CgilError(f"--val-split must be a fraction between 0 and 1, got {split}")


def absolute_paths(values: dict, typed: set[str]) -> None:
    """Paths typed now are made absolute, so that config.json, `--resume`, `--config` and `cgil eval`
    work from any directory; values read back from a saved run are kept exactly as saved (resume compares them)."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    if "dataset" in typed and values["dataset"].startswith("folder:"):
        values["dataset"] = "folder:" + absolute(values["dataset"][len("folder:"):])
    if "data_dir" in typed and values["data_dir"]:
        values["data_dir"] = absolute(values["data_dir"])
    if "pretrained" in typed and values["pretrained"] and looks_like_path(values["pretrained"]):
        values["pretrained"] = absolute(values["pretrained"])


def refuse_finished_run(out: Optional[Path], methods: list[str], resume: bool) -> None:
    """An --out that already holds a run, refused before the dataset scan (prepare() checks again)."""
    if resume or out is None:
        return
    for m in methods:
        run_dir = out / m if len(methods) > 1 else out
        if (run_dir / "state" / "CURRENT").exists():
            raise CgilError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
