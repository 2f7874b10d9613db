"""Checks of `cgil train` arguments that need no torch: run before anything heavy is imported or scanned.

A wrong flag costs the user a second, not the torch import and a dataset scan (issue 17, item 15).
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
