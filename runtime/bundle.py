"""Reading a deployment bundle without torch: the bundle format is defined here, written by export.bundle.

A bundle is a directory:

    BUNDLE/
      manifest.json            kind "cgil-bundle": schema version, model identity, preprocessing,
                               precision, format, engine paths, export checks, the exported head's
                               class names and version, and the sha256 + size of every file below
                               except those under heads/ (which have their own manifests)
      image.onnx               the image engine (uint8 NHWC pixels -> normalised embedding)
      text_zero_shot.onnx      token ids -> zero-shot text embedding (add class names on device)
      text_prompted.onnx       learned context + token ids -> class key
      tokenizer/               the BPE vocabulary the text graphs expect
      tensorrt/image.plan      (--format tensorrt) a serialized engine + its cache key
      triton/cgil_image/...    (--format triton) a Triton model repository; then the image engine lives there
      heads/CURRENT            pointer to the current head version (atomic swap, see cgil.artifacts.publish_version)
      heads/head-0004/         manifest.json (kind "cgil-head", model identity), head.safetensors {keys,
                               future_keys}, head.json, prompt_context.safetensors, store.*, prompts.*

The engine files are written once; heads are versioned so that an update publishes a new head
(and replay store) next to the old one and rollback is a pointer rewrite.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cgil.artifacts import verify_manifest  # torch-free
from cgil.errors import CgilError

MANIFEST = "manifest.json"
BUNDLE_KIND = "cgil-bundle"
HEAD_KIND = "cgil-head"
HEADS_DIR = "heads"
POINTER = "CURRENT"


def read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    """Parse and check one manifest: schema version, kind, and the size and sha256 of every listed file."""
    return verify_manifest(directory, kind)


def open_bundle(bundle: str | os.PathLike) -> dict[str, Any]:
    return read_manifest(Path(bundle), BUNDLE_KIND)


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("model", "weights_id", "config_sha")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_model(identity: dict[str, Any]) -> str:
    return f"{identity.get('model')} ({identity.get('weights_id')}, config {identity.get('config_sha')})"


@dataclass(frozen=True)
class Head:
    """An immutable classifier head: swapping heads is replacing one reference (see Classifier.load_head)."""

    keys: np.ndarray  # (C, D) float32, rows L2-normalised
    class_names: list[str]
    class_ids: list[int]
    version: int
    identity: dict[str, Any]
    directory: Optional[Path] = None
    future_keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    future_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def with_future(self) -> "Head":
        """Learned classes plus the zero-shot keys of known, not yet learned names."""
        if not self.future_names:
            return self
        return Head(np.concatenate([self.keys, self.future_keys]), self.class_names + self.future_names,
                    self.class_ids + [-1] * len(self.future_names), self.version, self.identity, self.directory)


def head_dir(path: Path) -> Path:
    """A bundle (-> its current head), a bundle's heads/ folder, or one head version folder."""
    path = Path(path)
    for root in (path / HEADS_DIR, path):
        pointer = root / POINTER
        if pointer.is_file():
            name = pointer.read_text().strip()
            if not name or not (root / name).is_dir():
                raise CgilError(f"{pointer} points at {name!r}, which does not exist")
            return root / name
    if (path / HEADS_DIR).is_dir() or (path / MANIFEST).is_file() and not (path / "head.json").exists():
        raise CgilError(f"{path} has no published head ({HEADS_DIR}/{POINTER} is missing)")
    return path


def load_head(path: str | os.PathLike, engine_identity: Optional[dict[str, Any]] = None) -> Head:
    """Read and verify a head; refuse it if it was made with another model than the engine's."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = head_dir(Path(path))
    manifest = read_manifest(directory, HEAD_KIND)
    try:
        meta = json.loads((directory / "head.json").read_text())
        tensors = load_file(str(directory / "head.safetensors"))
    except FileNotFoundError as e:
        raise CgilError(f"{directory}: missing {Path(e.filename).name}") from e
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CgilError(f"{directory}: corrupt head file: {e}") from e
    identity = meta.get("model") or manifest.get("model") or {}
    if engine_identity is not None and not same_model(identity, engine_identity):
        raise CgilError(f"{directory / 'head.json'} was trained for {describe_model(identity)}, but the bundle's image "
                        f"engine is {describe_model(engine_identity)}: its keys are not comparable with these embeddings")
    if manifest.get("model") and not same_model(manifest["model"], identity):
        raise CgilError(f"{directory}: head.json and manifest.json name different models")
    keys = np.ascontiguousarray(tensors.get("keys", np.zeros((0, 0), np.float32)), dtype=np.float32)
    names = list(meta.get("class_names", []))
    dim = int(identity.get("embed_dim") or keys.shape[-1])
    if keys.ndim != 2 or keys.shape[0] != len(names) or (keys.size and keys.shape[1] != dim):
        raise CgilError(f"{directory / 'head.safetensors'}: keys of shape {keys.shape} do not fit "
                        f"{len(names)} class names and embedding size {dim}")
    future_names = list(meta.get("future_class_names", []))
    future = np.asarray(tensors.get("future_keys", np.zeros((0, keys.shape[1]), np.float32)), dtype=np.float32)
    if future.shape[0] != len(future_names):
        raise CgilError(f"{directory / 'head.safetensors'}: {future.shape[0]} future keys for {len(future_names)} names")
    return Head(keys, names, [int(c) for c in meta.get("class_ids", [])], int(meta.get("head_version", 0)),
                identity, directory, future, future_names)
