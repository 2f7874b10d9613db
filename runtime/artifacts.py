"""Durable, verifiable files: atomic writes, safetensors + JSON, manifests with sha256.

A reader never sees a half-written file: everything is written to a temporary name in the same
directory, fsynced, then renamed over the target. A versioned directory (a run's state, a bundle's
head) is written whole into a fresh folder and published by atomically rewriting a small pointer file.

Torch-free: the device side verifies and publishes with it, the learner writes its runs with it
(torch tensors go through cgil.tensor_io, which builds on this module).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import CgilError
from .format import HISTORY, MANIFEST, POINTER, SCHEMA_VERSION


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


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CgilError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CgilError(f"{path} is corrupt: {e}") from e


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
    """Check schema version, kind, and every listed file's size and sha256; raise a CgilError naming what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CgilError(f"{directory} does not exist or is not a directory")
    if not path.is_file():
        what = f"a complete {kind}" if kind else "complete"
        raise CgilError(f"{directory} is not {what} (no {MANIFEST}): an interrupted write or the wrong folder")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise CgilError(f"{path} is corrupt: not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CgilError(f"{path}: schema version {version}, this cgil reads {SCHEMA_VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise CgilError(f"{directory} holds a {manifest.get('kind')!r}, expected a {kind!r}")
    for name, info in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise CgilError(f"{file} is listed in {path} but missing")
        size = file.stat().st_size
        if size != info.get("bytes", size):
            raise CgilError(f"{file} has {size} bytes, the manifest says {info['bytes']} (truncated or modified)")
        if sha256_file(file) != info["sha256"]:
            raise CgilError(f"{file} does not match its sha256 in {path} (corrupt or modified)")
    return manifest


def publish_version(root: str | os.PathLike, name: str, write: Callable[[Path], None], kind: str,
                    extra: Optional[dict[str, Any]] = None, keep: int = 2, overwrite: bool = True) -> Path:
    """Write a new version directory `root/name` with `write(tmpdir)`, then point `root/CURRENT` at it.

    Until the pointer is rewritten, readers see the previous version untouched; a crash at any
    point leaves at worst an orphaned temporary folder, never a half-written current version.
    `history.json` lists the last `keep` published versions (the rollback targets); older ones are
    deleted. With overwrite=False an existing `root/name` is refused (version names never reused).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not overwrite:
        raise CgilError(f"{final} exists already; versions are never overwritten")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        write(tmp)
        write_manifest(tmp, kind, extra)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = current_version(root)
    history = [n for n in read_history(root) if n != name and (root / n).exists()]
    if previous and previous != name and previous not in history:
        history.append(previous)
    atomic_write_text(root / POINTER, name + "\n")  # the one switch readers see
    history.append(name)
    for old in history[:-keep]:  # the previous version always survives, for readers and rollback
        shutil.rmtree(root / old, ignore_errors=True)
    atomic_write_json(root / HISTORY, history[-keep:])
    return final


def remove_orphans(root: str | os.PathLike) -> None:
    """Temporary version folders left by a killed writer (call only while no writer runs)."""
    for p in Path(root).iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def read_history(root: str | os.PathLike) -> list[str]:
    path = Path(root) / HISTORY
    if not path.exists():
        return []
    history = read_json(path)
    if not isinstance(history, list):
        raise CgilError(f"{path} is corrupt: not a list of versions")
    return [str(n) for n in history]


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
