"""Durable, verifiable files: atomic writes, safetensors + JSON, manifests with sha256.

A reader never sees a half-written file: everything is written to a temporary name in the same
directory, fsynced, then renamed over the target. A versioned directory (a run's state, a bundle's
head) is written whole into a fresh folder and published by atomically rewriting a small pointer file.

Torch-free: the device side verifies and publishes with it, the learner writes its runs with it
(torch tensors go through cgil.tensor_io, which builds on this module).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import CgilError
from .format import HISTORY, MANIFEST, POINTER, SCHEMA_VERSION


def version_path(root: Path, name: Any, where: str, pattern: Optional[re.Pattern] = None) -> Path:
    """root/name for a version name read from disk (a pointer, a history): refused unless it is one plain
    folder name (matching `pattern` when given) that stays directly inside root once symlinks are resolved.
    A tampered history or pointer must never make a writer read or delete anything elsewhere."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or (pattern is not None and not pattern.match(name))):
        raise CgilError(f"{where} names {str(name)!r}, which is not a version folder name"
                        + (f" ({pattern.pattern})" if pattern is not None else ""))
    path = Path(root) / name
    if path.resolve().parent != Path(root).resolve():
        raise CgilError(f"{where} names {name!r}, which resolves outside {root}")
    return path


CACHE_ENV = "CGIL_CACHE"


def cache_root(*parts: str) -> Path:
    """Where every cache of cgil lives (features, TensorRT engines, the TensorRT EP's caches): $CGIL_CACHE
    when set and not empty, else ~/.cache/cgil. The one rule: an empty variable must not mean the cwd."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/cgil").expanduser().joinpath(*parts)


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


def verify_manifest(directory: str | os.PathLike, kind: Optional[str] = None,
                    unchecked: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check schema version, kind, every listed file's size and sha256, and that no other file is there
    (except under the `unchecked` sub-folders, which have manifests of their own); raise a CgilError naming
    what is wrong."""
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
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise CgilError(f"{path} is corrupt: 'files' is not a mapping")
    unlisted = [str(p.relative_to(directory)) for p in sorted(directory.rglob("*"))
                if (p.is_file() or p.is_symlink()) and p.name != MANIFEST
                and not any(p.relative_to(directory).is_relative_to(x) for x in unchecked)
                and str(p.relative_to(directory)) not in files]
    if unlisted:  # an added or edited file that no sha256 covers must not be served
        raise CgilError(f"{directory / unlisted[0]} is not listed in {path} (added after the manifest was written)")
    for name, info in files.items():
        file = directory / name
        if not file.resolve().is_relative_to(directory.resolve()):
            raise CgilError(f"{path} lists {name!r}, which resolves outside {directory}")
        check_manifest_entry(path, name, info)
        if not file.is_file():
            raise CgilError(f"{file} is listed in {path} but missing")
        size = file.stat().st_size
        if size != info.get("bytes", size):
            raise CgilError(f"{file} has {size} bytes, the manifest says {info['bytes']} (truncated or modified)")
        if sha256_file(file) != info["sha256"]:
            raise CgilError(f"{file} does not match its sha256 in {path} (corrupt or modified)")
    return manifest


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_manifest_entry(path: Path, name: str, info: Any) -> None:
    """One entry of a manifest's `files`: {"sha256": 64 hex digits, "bytes": a size (optional)}."""
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"]):
        raise CgilError(f"{path} is corrupt: the entry of {name!r} is {json.dumps(info)[:80]}, not "
                        f'{{"sha256": <64 hex digits>, "bytes": <size>}}')
    size = info.get("bytes", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CgilError(f"{path} is corrupt: the entry of {name!r} gives {json.dumps(size)[:40]} bytes, not a size")


def publish_version(root: str | os.PathLike, name: str, write: Callable[[Path], None], kind: str,
                    extra: Optional[dict[str, Any]] = None, keep: int = 2, overwrite: bool = True,
                    pattern: Optional[re.Pattern] = None) -> Path:
    """Write a new version directory `root/name` with `write(tmpdir)`, then point `root/CURRENT` at it.

    Until the pointer is rewritten, readers see the previous version untouched; a crash at any
    point leaves at worst an orphaned temporary folder, never a half-written current version.
    `history.json` lists the last `keep` published versions (the rollback targets); older ones are
    deleted. With overwrite=False an existing `root/name` is refused (version names never reused).
    With `pattern` (the version names, e.g. head-NNNN) every name read from the pointer and the history
    must match it and stay inside root, and every complete version that is neither current nor kept
    is removed after the switch.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not overwrite:
        raise CgilError(f"{final} exists already; versions are never overwritten")
    # every name read from disk is checked before anything is written, kept or deleted
    previous = current_version(root)
    if previous is not None:
        version_path(root, previous, str(root / POINTER), pattern)
    history = [n for n in read_history(root) if n not in (name, previous)
               and version_path(root, n, str(root / HISTORY), pattern).exists()]
    # the version serving until now is the first rollback target and is never pruned, wherever the
    # history put it (heads/CURRENT edited by hand may point at its oldest entry)
    if previous and previous != name:
        history.append(previous)
    history.append(name)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
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
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only folder: one line, the bundle unchanged
            raise CgilError(f"cannot write {written_file(e, tmp, final)}: {e.strerror or e}") from e
        raise
    try:
        atomic_write_text(root / POINTER, name + "\n")  # the one switch readers see
    except OSError as e:  # the old pointer is intact: drop the new version, nothing changed
        shutil.rmtree(final, ignore_errors=True)
        raise CgilError(f"cannot write {root / POINTER}: {e.strerror or e}; "
                        f"{previous or 'the previous version'} stays current") from e
    try:
        atomic_write_json(root / HISTORY, history[-keep:])
    except OSError as e:  # switch back, so that a failed update leaves the bundle as it was
        with contextlib.suppress(OSError):
            if previous:
                atomic_write_text(root / POINTER, previous + "\n")
                shutil.rmtree(final, ignore_errors=True)
        raise CgilError(f"cannot write {root / HISTORY}: {e.strerror or e}") from e
    if pattern is not None:  # the previous version always survives, for readers and rollback
        remove_stale_versions(root, pattern)
    else:
        for old in history[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    return final


def written_file(e: OSError, tmp: Optional[Path], final: Path) -> Path:
    """The file a failed write was writing, under the name it would have had once published. A copy that
    fails (shutil.copyfile) reports its source as `filename` and its destination as `filename2`: the
    source is a file of the live version being read, and naming it would send the operator to the wrong file."""
    target = Path(e.filename2 or e.filename or final)
    if tmp is not None and target.is_relative_to(tmp):
        return final / target.relative_to(tmp)
    return target


def remove_stale_versions(root: str | os.PathLike, pattern: re.Pattern) -> list[str]:
    """Delete every version folder that is neither current nor in the history (a version rolled back
    from, or one renamed into place by a writer killed before its pointer switch). Call under the lock."""
    root = Path(root)
    current = current_version(root)
    wanted = set(read_history(root)) | ({current} if current else set())
    removed = []
    for p in sorted(root.iterdir()):
        if pattern.match(p.name) and p.name not in wanted:
            if p.is_symlink():  # never follow a link out of root
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            else:
                continue
            removed.append(p.name)
    if removed:
        fsync_dir(root)
    return removed


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
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CgilError(f"{path} is corrupt (not UTF-8 text)") from None
    except OSError as e:
        raise CgilError(f"cannot read {path}: {e.strerror}") from None
    return name or None


def current_dir(root: str | os.PathLike) -> Path:
    name = current_version(root)
    if name is None:
        raise CgilError(f"{root} holds no published version (no {POINTER} pointer)")
    return Path(root) / name
