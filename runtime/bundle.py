"""Reading a deployment bundle without torch: the bundle format is defined here, written by export.bundle.
Every name in it is untrusted: paths must stay inside the bundle and values are sanity-checked.

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
      heads/CURRENT            pointer to the current head version (atomic swap, see runtime.heads)
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
from typing import Any, Optional, Union

import numpy as np

from .artifacts import verify_manifest, version_path
from .errors import CgilError
from .format import BUNDLE_KIND, HEAD_KIND, HEAD_META, HEAD_TENSORS, HEADS_DIR, MANIFEST, POINTER, VERSION_RE
from .identity import ModelIdentity

PRECISIONS = ("fp32", "fp16", "int8")


def read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    """Parse and check one manifest: schema version, kind, and the size and sha256 of every listed file."""
    refuse_training_run(Path(directory))
    # a bundle's manifest covers every file but heads/, whose versions have manifests of their own
    return verify_manifest(directory, kind, unchecked=(HEADS_DIR,) if kind == BUNDLE_KIND else ())


def refuse_training_run(directory: Path) -> None:
    """A `cgil train` run folder given where a bundle is expected: say how to make the bundle.

    A run holds config.json (one per method inside for `--method all`) and no bundle manifest; the
    layout is cgil.train's, recognised here by name only (runtime never imports the learner).
    """
    if (directory / MANIFEST).is_file() or not directory.is_dir():
        return
    if (directory / "config.json").is_file():
        raise CgilError(f"{directory} is a training run, not a bundle; export it first: "
                        f"cgil export {directory} --out BUNDLE")
    methods = sorted(p.parent.name for p in directory.glob("*/config.json"))
    if methods:
        raise CgilError(f"{directory} holds training runs ({', '.join(methods)}), not a bundle; export one first: "
                        f"cgil export {directory / methods[0]} --out BUNDLE")


def inside(root: Path, relative: Any, what: str) -> Path:
    """`root / relative`, refused unless it stays inside root once symlinks are resolved."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise CgilError(f"{root}: {what} {relative!r} is not a relative path inside the bundle")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise CgilError(f"{root}: {what} {relative!r} points outside the bundle")
    return path


@dataclass(frozen=True)
class BundleManifest:
    """A bundle's manifest.json, checked: what a device needs to run the engine and read heads."""

    directory: Path
    identity: ModelIdentity
    preprocess: dict[str, Any]
    precision: str
    max_batch: int
    logit_scale: float
    image_engine: Path  # ONNX image graph, inside the bundle
    engine: dict[str, Any]  # as written: "image", optional "tensorrt" {plan, key}, "triton"
    text: Optional[dict[str, Any]]  # zero_shot / prompted graph paths, template, tokenizer
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def parse(cls, directory: Path, m: dict[str, Any]) -> "BundleManifest":
        where = directory / MANIFEST
        engine = m.get("engine")
        if not isinstance(engine, dict):
            raise CgilError(f"{where}: no engine section")
        precision = m.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise CgilError(f"{where}: unknown precision {precision!r}")
        try:
            logit_scale = float(m.get("logit_scale", 100.0))
            max_batch = int(m.get("max_batch", 32))
        except (TypeError, ValueError) as e:
            raise CgilError(f"{where}: malformed logit_scale or max_batch ({e})") from None
        if not np.isfinite(logit_scale) or not 0 < logit_scale <= 1000:
            raise CgilError(f"{where}: logit_scale {logit_scale} is not a finite value in CLIP's range (0, 1000]")
        if max_batch < 1:
            raise CgilError(f"{where}: max_batch {max_batch} must be at least 1")
        if not isinstance(m.get("preprocess"), dict):
            raise CgilError(f"{where}: no preprocess section")
        from .preprocess import Preprocess

        try:
            Preprocess.from_config(m["preprocess"])
        except CgilError as e:
            raise CgilError(f"{where}: {e}") from None
        text = m.get("text")
        if text is not None:
            if not isinstance(text, dict) or not isinstance(text.get("tokenizer"), dict):
                raise CgilError(f"{where}: malformed text section")
            for key in ("zero_shot", "prompted"):
                inside(directory, text.get(key), f"text graph {key}")
            inside(directory, text["tokenizer"].get("vocab"), "tokenizer vocabulary")
        if engine.get("tensorrt"):
            inside(directory, engine["tensorrt"].get("plan"), "TensorRT plan")
        return cls(directory, ModelIdentity.from_dict(m.get("model"), str(where)), m["preprocess"], precision,
                   max_batch, logit_scale, inside(directory, engine.get("image"), "image engine"), engine, text, m)


def open_bundle(bundle: str | os.PathLike) -> BundleManifest:
    directory = Path(bundle)
    return BundleManifest.parse(directory, read_manifest(directory, BUNDLE_KIND))


@dataclass(frozen=True)
class Head:
    """An immutable classifier head: swapping heads is replacing one reference (see Classifier.load_head)."""

    keys: np.ndarray  # (C, D) float32, rows L2-normalised
    class_names: list[str]
    class_ids: list[int]
    version: int
    identity: ModelIdentity
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


UNIT_NORM_TOLERANCE = 1e-3  # float32 keys written normalised are within 1e-6; fp16 round trips within 1e-3


def check_head(keys: np.ndarray, names: Any, future: np.ndarray, future_names: Any, dim: int, where: Any) -> None:
    """Sanity, not only integrity: a head that passes its sha256 can still be NaN (a diverged update) or
    empty, and serving it would answer `null` scores or 500. Refuse it with the reason."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CgilError(f"{where}: class_names is not a list of names")
    if not isinstance(future_names, list) or not all(isinstance(n, str) for n in future_names):
        raise CgilError(f"{where}: future_class_names is not a list of names")
    if not names:
        raise CgilError(f"{where}: the head has no classes")
    for label, k, n in (("keys", keys, names), ("future keys", future, future_names)):
        if k.ndim != 2 or k.shape[0] != len(n) or (k.shape[0] and k.shape[1] != dim):
            raise CgilError(f"{where}: {label} of shape {tuple(k.shape)} do not fit {len(n)} class names "
                            f"and embedding size {dim}")
        if not k.size:
            continue
        bad = ~np.isfinite(k).all(axis=1)
        if bad.any():
            raise CgilError(f"{where}: {int(bad.sum())} of {len(k)} {label} are not finite (NaN or inf), "
                            f"e.g. class {n[int(np.argmax(bad))]!r}: a diverged update (lower --lr)")
        norms = np.linalg.norm(k.astype(np.float64), axis=1)
        off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
        if off.any():
            i = int(np.argmax(off))
            raise CgilError(f"{where}: {int(off.sum())} of {len(k)} {label} are not of unit norm "
                            f"(class {n[i]!r} has norm {norms[i]:.6g})")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_head_meta(meta: dict[str, Any], directory: Path) -> int:
    """What head.json says must agree with the folder it is in: its head_version with the folder's head-NNNN,
    and one integer class id per class name (learned, future). A head.json copied from another version
    would otherwise serve, and answer every request, under the wrong version. Returns the version."""
    where = directory / HEAD_META
    version = meta.get("head_version", 0)
    if not _int(version) or version < 0:
        raise CgilError(f"{where}: head_version {json.dumps(version)[:40]} is not a version number")
    folder = VERSION_RE.match(directory.name)
    if folder and int(folder.group(1)) != version:
        raise CgilError(f"{where} says head_version {version}, but it is in the folder {directory.name}: "
                        f"a head.json copied from another version or edited")
    for ids_key, names_key in (("class_ids", "class_names"), ("future_class_ids", "future_class_names")):
        ids, names = meta.get(ids_key, []), meta.get(names_key, [])
        if ids_key == "future_class_ids" and not ids:  # optional: future classes are served by name only
            continue
        if not isinstance(ids, list) or not all(_int(i) for i in ids) or not isinstance(names, list) \
                or len(ids) != len(names):
            raise CgilError(f"{where}: {ids_key} must be one integer per name of {names_key} "
                            f"({len(names) if isinstance(names, list) else '?'} names)")
    return version


def check_head_files(directory: Path) -> None:
    """check_head on the files of a head version being written (before it is published)."""
    from safetensors.numpy import load_file

    meta = json.loads((directory / HEAD_META).read_text())
    tensors = load_file(str(directory / HEAD_TENSORS))
    keys = np.asarray(tensors.get("keys", np.zeros((0, 0), np.float32)), dtype=np.float32)
    future = np.asarray(tensors.get("future_keys", np.zeros((0, keys.shape[-1] if keys.ndim == 2 else 0), np.float32)),
                        dtype=np.float32)
    dim = keys.shape[1] if keys.ndim == 2 and keys.shape[0] else int(meta.get("model", {}).get("embed_dim", 0) or 0)
    check_head(keys, meta.get("class_names", []), future, meta.get("future_class_names", []), dim,
               f"new head version {meta.get('head_version', '?')} (refused, the bundle is unchanged)")
    try:
        check_head_meta(meta, directory)
    except CgilError as e:
        raise CgilError(f"new head version {meta.get('head_version', '?')} (refused, the bundle is unchanged): {e}") from None


def checked_version(root: Path, name: str, where: str) -> Path:
    """root/name for a version name read from disk: `head-NNNN`, a folder directly inside root."""
    return version_path(root, name, where, VERSION_RE)


def current_name(root: Path) -> str:
    pointer = root / POINTER
    try:
        name = pointer.read_text().strip()
    except UnicodeDecodeError:
        raise CgilError(f"{pointer} is corrupt (not UTF-8 text)") from None
    except OSError as e:
        raise CgilError(f"cannot read {pointer}: {e.strerror}") from None
    if not name or not checked_version(root, name, str(pointer)).is_dir():
        raise CgilError(f"{pointer} points at {name!r}, which does not exist")
    return name


def head_dir(path: Path) -> Path:
    """A bundle (-> its current head), a bundle's heads/ folder, or one head version folder."""
    path = Path(path)
    for root in (path / HEADS_DIR, path):
        if (root / POINTER).is_file():
            return root / current_name(root)
    if (path / HEADS_DIR).is_dir() or (path / MANIFEST).is_file() and not (path / HEAD_META).exists():
        raise CgilError(f"{path} has no published head ({HEADS_DIR}/{POINTER} is missing)")
    return path


def load_head(path: str | os.PathLike,
              engine_identity: Union[ModelIdentity, dict[str, Any], None] = None) -> Head:
    """Read and verify a head; refuse it if it was made with another model than the engine's."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = head_dir(Path(path))
    manifest = read_manifest(directory, HEAD_KIND)
    try:
        meta = json.loads((directory / HEAD_META).read_text())
        tensors = load_file(str(directory / HEAD_TENSORS))
    except FileNotFoundError as e:
        raise CgilError(f"{directory}: missing {Path(e.filename).name}") from e
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise CgilError(f"{directory}: corrupt head file: {e}") from e
    if not isinstance(meta, dict):
        raise CgilError(f"{directory / HEAD_META}: not a JSON object")
    identity = ModelIdentity.from_dict(meta.get("model") or manifest.get("model"), str(directory / HEAD_META))
    if engine_identity is not None:
        engine = ModelIdentity.of(engine_identity)
        if not identity.same_weights(engine):
            raise CgilError(f"{directory / HEAD_META} was trained for {identity.describe()}, but the bundle's image "
                            f"engine is {engine.describe()}: its keys are not comparable with these embeddings")
    if manifest.get("model") and not ModelIdentity.from_dict(manifest["model"], str(directory)).same_weights(identity):
        raise CgilError(f"{directory}: head.json and manifest.json name different models")
    keys = np.ascontiguousarray(tensors.get("keys", np.zeros((0, 0), np.float32)), dtype=np.float32)
    names = meta.get("class_names", [])
    future_names = meta.get("future_class_names", [])
    future = np.asarray(tensors.get("future_keys", np.zeros((0, keys.shape[-1] if keys.ndim == 2 else 0), np.float32)),
                        dtype=np.float32)
    check_head(keys, names, future, future_names, identity.embed_dim, directory / HEAD_TENSORS)
    version = check_head_meta(meta, directory)
    names, future_names = list(names), list(future_names)
    return Head(keys, names, list(meta.get("class_ids", [])), version, identity, directory, future, future_names)
