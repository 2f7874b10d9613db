"""Durable, verifiable files: atomic writes, safetensors + JSON, manifests with sha256.

A reader never sees a half-written file: everything is written to a temporary name in the same
directory, fsynced, then renamed over the target. A versioned directory (a run's state, a bundle)
is written whole into a fresh folder and published by atomically rewriting a small pointer file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CgilError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
POINTER = "CURRENT"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise CgilError(f"missing file {path}") from None
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CgilError(f"corrupt tensor file {path}: {e}") from e


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CgilError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise CgilError(f"corrupt JSON file {path}: {e}") from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, kind: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "files": {str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        **(extra or {}),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def verify_manifest(directory: str | os.PathLike, kind: Optional[str] = None) -> dict[str, Any]:
    """Check schema version, kind and every file's sha256; raise a CgilError naming what is wrong."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CgilError(f"{directory / MANIFEST}: schema version {version}, this cgil reads {SCHEMA_VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise CgilError(f"{directory} holds a {manifest.get('kind')!r}, expected a {kind!r}")
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CgilError(f"{path} is listed in the manifest but missing")
        if sha256_file(path) != info["sha256"]:
            raise CgilError(f"{path} does not match its sha256 in the manifest (corrupt or modified)")
    return manifest


def publish_version(root: str | os.PathLike, name: str, write: Callable[[Path], None], kind: str,
                    extra: Optional[dict[str, Any]] = None, keep: int = 2) -> Path:
    """Write a new version directory `root/name` with `write(tmpdir)`, then point `root/CURRENT` at it.

    Until the pointer is rewritten, readers see the previous version untouched; a crash at any
    point leaves at worst an orphaned temporary folder, never a half-written current version.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        write(tmp)
        write_manifest(tmp, kind, extra)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / POINTER, name + "\n")
    history = [n for n in read_history(root) if n != name and (root / n).exists()] + [name]
    for old in history[:-keep]:  # the previous version always survives, for readers and rollback
        shutil.rmtree(root / old, ignore_errors=True)
    atomic_write_json(root / "history.json", history[-keep:])
    return final


def read_history(root: Path) -> list[str]:
    path = root / "history.json"
    return list(read_json(path)) if path.exists() else []


def current_version(root: str | os.PathLike) -> Optional[str]:
    path = Path(root) / POINTER
    if not path.exists():
        return None
    name = path.read_text().strip()
    return name or None


def current_dir(root: str | os.PathLike) -> Path:
    name = current_version(root)
    if name is None:
        raise CgilError(f"{root} holds no published version (no {POINTER} pointer)")
    return Path(root) / name
