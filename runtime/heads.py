"""Head versions of a bundle: listing, the update lock, publishing, rollback, names, zero-shot classes.

heads/ holds one folder per version (head-NNNN: head, replay store, prompts, prompted-graph inputs,
sha256 manifest) and the one-line pointer heads/CURRENT. A version is written whole into a
temporary folder, fsynced and renamed, then the pointer is replaced atomically
(runtime.artifacts.publish_version): a process killed at any point leaves the previous version
current and intact. Everything here is torch-free; the learner's image updates (export.update)
publish through `publish_head` as well.

Every name read from disk (CURRENT, history.json) is untrusted: it must be `head-NNNN` and resolve
inside heads/ before it is read, kept or deleted.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .artifacts import (atomic_write_json, atomic_write_text, publish_version, read_history, remove_orphans,
                        remove_stale_versions)
from .bundle import Head, check_head_files, checked_version, current_name, load_head, open_bundle, refuse_training_run
from .errors import CgilError
from .names import clean_names, name_key
from .format import (HEAD_KIND, HEAD_META, HEAD_TENSORS, HEADS_DIR, HISTORY, KEEP, LOCK, MANIFEST, MAX_VERSION,
                     MAX_VERSION_DIGITS, NEWEST, POINTER, PROMPTS_META, VERSION_RE, version_name)

Report = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- versions on disk

def heads_root(bundle: str | os.PathLike) -> Path:
    root = Path(bundle) / HEADS_DIR
    if not (root / POINTER).is_file():
        refuse_training_run(Path(bundle))
        raise CgilError(f"{bundle} is not a bundle with versioned heads (no {HEADS_DIR}/{POINTER})")
    return root


def version_dirs(root: Path) -> dict[int, Path]:
    out = {}
    for p in root.iterdir():
        m = VERSION_RE.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


@contextlib.contextmanager
def update_lock(root: Path) -> Iterator[None]:
    """One update (or rollback) of a bundle at a time; the lock dies with its process (kill -9 included)."""
    with open(root / LOCK, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CgilError(f"another cgil update of {root.parent} is running") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def newest_recorded(root: Path) -> int:
    """The highest version number ever published here (heads/NEWEST), so that pruning never lets a number be
    reused; 0 when there is no such file. Anything else in it is refused, naming the file: a silent 0 would
    reuse numbers, and a huge number would give a version folder name the file system refuses."""
    path = root / NEWEST
    try:
        with open(path, "rb") as f:
            raw = f.read(64)  # a valid file holds at most MAX_VERSION_DIGITS digits and a newline
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise CgilError(f"cannot read {path}: {e.strerror or e}") from None
    text = raw.strip()
    if not (text.isdigit() and len(text) <= MAX_VERSION_DIGITS):
        size = path.stat().st_size
        raise CgilError(f"{path} is corrupt ({size} bytes): it must hold the highest head version number ever "
                        f"published, 1 to {MAX_VERSION_DIGITS} digits; write that number into it (see heads/history.json "
                        f"and the head-NNNN folders)")
    return int(text)


def next_version(root: Path, current: int) -> int:
    version = max([current, newest_recorded(root), *version_dirs(root)]) + 1
    if version > MAX_VERSION:
        raise CgilError(f"{root}: no head version number is left after {version - 1} (at most {MAX_VERSION})")
    return version


def prune(root: Path) -> list[str]:
    """Under the update lock: remove temporary folders of killed writers and every complete version that
    is neither current nor a rollback target (a version rolled back from, or one renamed into place by
    a writer killed before its pointer switch). Returns the versions removed."""
    remove_orphans(root)
    current_name(root)  # a pointer that is not a valid version stops here, before anything is deleted
    for n in read_history(root):
        checked_version(root, n, str(root / HISTORY))
    wanted = set(read_history(root)) | {current_name(root)}
    stale = [v for v, p in version_dirs(root).items() if p.name not in wanted]
    if stale and max(stale) > newest_recorded(root):  # written only when a number is about to disappear
        record_newest(root, max(stale))
    return remove_stale_versions(root, VERSION_RE)


def record_newest(root: Path, version: int) -> None:
    try:
        atomic_write_text(root / NEWEST, f"{max(version, newest_recorded(root))}\n")
    except OSError as e:
        raise CgilError(f"cannot write {root / NEWEST}: {e.strerror or e}") from e


def publish_head(root: Path, version: int, write: Callable[[Path], None], model: dict[str, Any],
                 keep: int = KEEP) -> Path:
    """Write heads/head-NNNN with `write(tmpdir)` + a sha256 manifest, then switch heads/CURRENT to it.

    The head is checked for sanity (runtime.bundle.check_head) in the temporary folder, before the
    switch: a head that would break serving is refused and the bundle stays as it was.
    """
    def write_checked(d: Path) -> None:
        write(d)
        check_head_files(d)

    return publish_version(root, version_name(version), write_checked, kind=HEAD_KIND, extra={"model": model},
                           keep=keep, overwrite=False, pattern=VERSION_RE)


def rollback(bundle: str | os.PathLike, report: Report = _quiet) -> tuple[str, str]:
    """Point heads/CURRENT back at the version published before the current one. Returns (from, to)."""
    root = heads_root(bundle)
    with update_lock(root):
        current = current_name(root)
        history = [n for n in read_history(root) if checked_version(root, n, str(root / HISTORY)).is_dir()]
        earlier = history[:history.index(current)] if current in history else history
        earlier = [n for n in earlier if n != current]
        if not earlier:
            raise CgilError(f"{bundle}: no previous head version to roll back to (current {current})")
        target = earlier[-1]
        load_head(root / target)  # verify before switching
        atomic_write_json(root / HISTORY, [n for n in history if n != current])
        atomic_write_text(root / POINTER, target + "\n")
        prune(root)  # the version rolled back from is neither current nor a rollback target any more
    report(f"rolled back {bundle}: {current} -> {target}")
    return current, target


# ---------------------------------------------------------------- what a head version holds

def head_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / HEAD_META).read_text())


def successor_meta(head: Head, old: dict[str, Any], version: int, class_ids: list[int], class_names: list[str],
                   zero_shot_names: list[str], added: Sequence[str], **extra: Any) -> tuple[dict[str, Any], np.ndarray]:
    """head.json of the version after `head` (its meta `old` with the new classes and `extra` fields) and its
    future keys: a future class whose name was just added leaves the future list. The one builder for
    name-only (add_zero_shot) and image (export.update) updates."""
    keep = [i for i, n in enumerate(head.future_names) if n not in added]
    future_ids = old.get("future_class_ids") or []
    meta = {**old, "head_version": version, "class_ids": class_ids, "class_names": class_names,
            "future_class_ids": [future_ids[i] for i in keep] if future_ids else [],
            "future_class_names": [head.future_names[i] for i in keep],
            "zero_shot_class_names": zero_shot_names, **extra}
    future = head.future_keys[keep] if keep else np.zeros((0, head.keys.shape[1]), np.float32)
    return meta, future


def learned_names(directory: Path) -> list[str]:
    """Names of the classes with learned prompts (the others in the head are zero-shot)."""
    prompts = directory / PROMPTS_META
    return list(json.loads(prompts.read_text())["class_names"]) if prompts.exists() else []


def version_model(directory: Path, bundle_model: dict[str, Any]) -> dict[str, Any]:
    """The model identity recorded in a head version's manifest, else the bundle's."""
    try:
        return json.loads((directory / MANIFEST).read_text()).get("model") or bundle_model
    except (OSError, json.JSONDecodeError):
        return bundle_model


def write_head_files(d: Path, keys: np.ndarray, future_keys: np.ndarray, meta: dict[str, Any]) -> None:
    """head.safetensors {keys, future_keys} + head.json: the one writer of a head's files (runs and bundles)."""
    from safetensors.numpy import save_file

    tensors = {"keys": np.ascontiguousarray(keys, np.float32)}
    if len(meta.get("future_class_names", [])):
        tensors["future_keys"] = np.ascontiguousarray(future_keys, np.float32)
    save_file(tensors, str(d / HEAD_TENSORS))
    atomic_write_json(d / HEAD_META, meta)


def check_new_names(names: Sequence[str], head_names: Sequence[str], learned: Sequence[str],
                    allow_zero_shot: bool) -> list[str]:
    """New class names under the name rule (runtime.names), cleaned; they must be new (compared by name_key).

    With allow_zero_shot a zero-shot class of the head may be learned from images, under its exact name.
    """
    names = clean_names(names, learned if allow_zero_shot else head_names,
                        taken_as="learned already" if allow_zero_shot else "already in the head")
    if allow_zero_shot:
        spelled = {name_key(n): n for n in head_names}
        near = [(n, spelled[name_key(n)]) for n in names if name_key(n) in spelled and spelled[name_key(n)] != n]
        if near:
            raise CgilError("class name(s) differ only in case or width from a class of the head: "
                            + ", ".join(f"{n!r} vs {old!r}" for n, old in near) + "; use the exact name or a new one")
    return names


# ---------------------------------------------------------------- name-only update

def add_zero_shot(bundle: str | os.PathLike, names: Sequence[str], report: Report = _quiet,
                  keep: int = KEEP) -> dict[str, Any]:
    """Publish a head with zero-shot keys for new class names (the bundle's text ONNX graph; no torch).

    `keep`: head versions kept on disk after publishing (keep - 1 rollbacks remain possible)."""
    from .text import TextEncoderRuntime

    bundle = Path(bundle)
    manifest = open_bundle(bundle)
    root = heads_root(bundle)
    with update_lock(root):
        prune(root)
        head = load_head(bundle, manifest.identity)
        names = check_new_names(names, head.class_names, learned_names(head.directory), allow_zero_shot=False)
        t0 = time.perf_counter()
        z = TextEncoderRuntime(bundle, manifest).zero_shot(names)
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        old = head_meta(head.directory)
        version = next_version(root, head.version)
        meta, future = successor_meta(
            head, old, version, list(head.class_ids) + [-1] * len(names), head.class_names + names,
            list(old.get("zero_shot_class_names", [])) + names, names,
            update={"kind": "zero-shot", "added": names, "from_version": head.version,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        keys = np.concatenate([head.keys, z.astype(np.float32)])
        src = head.directory

        def write(d: Path) -> None:
            for p in src.iterdir():
                if p.is_file() and p.name not in (MANIFEST, HEAD_META, HEAD_TENSORS):
                    shutil.copyfile(p, d / p.name)
            write_head_files(d, keys, future, meta)

        final = publish_head(root, version, write, version_model(src, manifest.raw["model"]), keep=keep)
    report(f"added {len(names)} zero-shot class(es) as {final.name} in {time.perf_counter() - t0:.2f}s: {', '.join(names)}")
    return {"version": version, "directory": str(final), "added": names}
