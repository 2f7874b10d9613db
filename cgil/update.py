"""On-device updates of a bundle: new classes from a few images, or by name alone; rollback; store sizes.

An image-based update (`update_from_images`) is the CGIL task update run against a bundle instead of
a training run:

  features    the new images are embedded with the bundle's own exported image engine
              (runtime.Classifier, ONNX Runtime), so they are exactly what serving computes;
  load        torch, the frozen CLIP (its text tower) and the learner state restored from the bundle;
  generators  the new classes' generators are fitted (one batched model, the store's family);
  alignment   the prompts of ALL classes are realigned on synthetic replay drawn from the bundle's
              replay store (old classes) and the new generators: this step needs torch and the
              frozen CLIP text tower, rebuilt from the bundle's model identity;
  write       a new head version (head + store + prompts + prompted-graph inputs) is published.

A name-only update (`add_zero_shot`) needs no torch: the key is the zero-shot text embedding of
"a photo of a {name}" from the bundle's text_zero_shot.onnx. A later image-based update of the
same name replaces that key with a learned prompt.

Publishing is atomic and torch-free (`publish_head` = cgil.artifacts.publish_version):
the version is written whole into a temporary folder, every file and the folder are fsynced, the
folder is renamed to heads/head-NNNN, then the one-line pointer heads/CURRENT is replaced atomically.
A process killed at any point leaves the previous version current and intact (at worst an orphaned
temporary folder, removed by the next update). `rollback` points CURRENT back at the previous version.
Only this module imports torch, and only inside `update_from_images`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .artifacts import (atomic_write_json, atomic_write_text, json_bytes, publish_version, read_history,
                        remove_orphans)
from .errors import CgilError

HEADS_DIR = "heads"
POINTER = "CURRENT"
HISTORY = "history.json"
MANIFEST = "manifest.json"
HEAD_KIND = "cgil-head"
KEEP = 2  # versions kept on disk after a publish: the current one and the previous (rollback target)
VERSION_RE = re.compile(r"^head-(\d+)$")
STORE_PRECISIONS = ("fp32", "fp16")
PHASES = ("features", "load", "generators", "alignment", "write")

Report = Callable[[str], None]


# ---------------------------------------------------------------- versions on disk (torch-free)

def heads_root(bundle: str | os.PathLike) -> Path:
    root = Path(bundle) / HEADS_DIR
    if not (root / POINTER).is_file():
        raise CgilError(f"{bundle} is not a bundle with versioned heads (no {HEADS_DIR}/{POINTER})")
    return root


def current_name(root: Path) -> str:
    name = (root / POINTER).read_text().strip()
    if not name or not (root / name).is_dir():
        raise CgilError(f"{root / POINTER} points at {name!r}, which does not exist")
    return name


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
    with open(root / ".update.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CgilError(f"another cgil update of {root.parent} is running") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def publish_head(root: Path, version: int, write: Callable[[Path], None], model: dict[str, Any],
                 keep: int = KEEP) -> Path:
    """Write heads/head-NNNN with `write(tmpdir)` + a sha256 manifest, then switch heads/CURRENT to it."""
    return publish_version(root, f"head-{version:04d}", write, kind=HEAD_KIND, extra={"model": model}, keep=keep,
                           overwrite=False)


def rollback(bundle: str | os.PathLike, report: Report = lambda s: None) -> tuple[str, str]:
    """Point heads/CURRENT back at the version published before the current one. Returns (from, to)."""
    from runtime.bundle import load_head

    root = heads_root(bundle)
    with update_lock(root):
        current = current_name(root)
        history = [n for n in read_history(root) if (root / n).is_dir()]
        earlier = history[:history.index(current)] if current in history else history
        earlier = [n for n in earlier if n != current]
        if not earlier:
            raise CgilError(f"{bundle}: no previous head version to roll back to (current {current})")
        target = earlier[-1]
        load_head(root / target)  # verify before switching
        atomic_write_text(root / POINTER, target + "\n")
        # the rolled-back version stays on disk (its number is never reused) but leaves the history
        atomic_write_json(root / HISTORY, [n for n in history if n != current])
    report(f"rolled back {bundle}: {current} -> {target}")
    return current, target


# ---------------------------------------------------------------- reading the current head

def _head_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "head.json").read_text())


def _learned_names(directory: Path) -> list[str]:
    prompts = directory / "prompts.json"
    return list(json.loads(prompts.read_text())["class_names"]) if prompts.exists() else []


def class_folders(data: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """DIR/<class>/* -> [(class name, image files)], folder names with '_' read as spaces, sorted."""
    from .data.folder import class_dirs, image_files

    data = Path(data)
    if not data.is_dir():
        raise CgilError(f"--data {data} is not a directory (expected one folder of images per new class)")
    out = []
    for d in class_dirs(data):
        files = image_files(d)
        if not files:
            raise CgilError(f"empty class folder: {d} holds no images")
        out.append((d.name.replace("_", " "), files))
    if not out:
        raise CgilError(f"--data {data} holds no class folders")
    return out


def check_new_names(names: Sequence[str], head_names: Sequence[str], learned: Sequence[str],
                    allow_zero_shot: bool) -> None:
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise CgilError(f"class name(s) given twice: {', '.join(dup)}")
    if any(not n.strip() for n in names):
        raise CgilError("empty class name")
    taken = set(learned) if allow_zero_shot else set(head_names)
    clash = sorted(set(names) & taken)
    if clash:
        what = "learned already" if allow_zero_shot else "already in the head"
        raise CgilError(f"class name(s) {what}: {', '.join(clash)}; new classes need new names")


# ---------------------------------------------------------------- name-only update (no torch)

def _write_head(d: Path, keys: np.ndarray, future_keys: np.ndarray, meta: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    tensors = {"keys": np.ascontiguousarray(keys, np.float32)}
    if len(meta.get("future_class_names", [])):
        tensors["future_keys"] = np.ascontiguousarray(future_keys, np.float32)
    save_file(tensors, str(d / "head.safetensors"))
    atomic_write_json(d / "head.json", meta)


def add_zero_shot(bundle: str | os.PathLike, names: Sequence[str], report: Report = lambda s: None) -> dict[str, Any]:
    """Publish a head with zero-shot keys for new class names (bundle's text ONNX graph; no torch)."""
    from runtime.bundle import load_head, open_bundle
    from runtime.text import TextEncoderRuntime

    bundle = Path(bundle)
    names = [n.strip() for n in names]
    manifest = open_bundle(bundle)
    root = heads_root(bundle)
    with update_lock(root):
        remove_orphans(root)
        head = load_head(bundle, manifest["model"])
        check_new_names(names, head.class_names, _learned_names(head.directory), allow_zero_shot=False)
        t0 = time.perf_counter()
        z = TextEncoderRuntime(bundle, manifest).zero_shot(names)
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        old = _head_meta(head.directory)
        version = max([head.version, *version_dirs(root)]) + 1
        keep_future = [i for i, n in enumerate(head.future_names) if n not in names]
        meta = dict(old)
        meta.update({
            "head_version": version,
            "class_ids": list(head.class_ids) + [-1] * len(names),
            "class_names": head.class_names + names,
            "future_class_ids": [old.get("future_class_ids", [])[i] for i in keep_future] if old.get("future_class_ids") else [],
            "future_class_names": [head.future_names[i] for i in keep_future],
            "zero_shot_class_names": list(old.get("zero_shot_class_names", [])) + names,
            "update": {"kind": "zero-shot", "added": names, "from_version": head.version,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        })
        keys = np.concatenate([head.keys, z.astype(np.float32)])
        future = head.future_keys[keep_future] if len(keep_future) else np.zeros((0, keys.shape[1]), np.float32)
        src = head.directory

        def write(d: Path) -> None:
            for p in src.iterdir():
                if p.is_file() and p.name not in (MANIFEST, "head.json", "head.safetensors"):
                    shutil.copyfile(p, d / p.name)
            _write_head(d, keys, future, meta)

        final = publish_head(root, version, write, _manifest_model(src, manifest))
    report(f"added {len(names)} zero-shot class(es) as {final.name} in {time.perf_counter() - t0:.2f}s: {', '.join(names)}")
    return {"version": version, "directory": str(final), "added": names}


def _manifest_model(directory: Path, bundle_manifest: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads((directory / MANIFEST).read_text()).get("model") or bundle_manifest["model"]
    except (OSError, json.JSONDecodeError):
        return bundle_manifest["model"]


# ---------------------------------------------------------------- image-based update (torch)

def update_from_images(bundle: str | os.PathLike, data: str | os.PathLike, epochs: Optional[int] = None,
                       lr: Optional[float] = None, passes: Optional[int] = None, seed: int = 1992,
                       store_precision: str = "fp32", report: Report = lambda s: None) -> dict[str, Any]:
    """Learn the classes in DATA/<class>/ and publish a new head version. Returns timings and the version."""
    if store_precision not in STORE_PRECISIONS:
        raise CgilError(f"unknown store precision {store_precision!r}; choose one of: {', '.join(STORE_PRECISIONS)}")
    from runtime.bundle import load_head, open_bundle

    bundle = Path(bundle)
    timings = {p: 0.0 for p in PHASES}
    folders = class_folders(data)
    names = [n for n, _ in folders]
    manifest = open_bundle(bundle)
    root = heads_root(bundle)
    with update_lock(root):
        remove_orphans(root)
        head = load_head(bundle, manifest["model"])
        src = head.directory
        learned = _learned_names(src)
        if not (src / "store.json").exists() or not learned:
            raise CgilError(f"{src} holds no replay store / prompts: an image update needs a bundle exported from a CGIL run")
        check_new_names(names, head.class_names, learned, allow_zero_shot=True)

        # 1. features from the bundle's own image engine
        t0 = time.perf_counter()
        from runtime.classifier import Classifier

        engine = Classifier(bundle, backend="onnxruntime")
        feats, labels, counts, image_bytes = [], [], [], []
        for k, (name, files) in enumerate(folders):
            e = engine.embed(files)
            feats.append(e)
            labels += [k] * len(e)
            counts.append(len(files))
            image_bytes.append(sum(f.stat().st_size for f in files))
            report(f"  {name}: {len(files)} images embedded")
        timings["features"] = time.perf_counter() - t0

        # 2. the learner: torch, the frozen CLIP (for its text tower) and the store, from the bundle
        t0 = time.perf_counter()
        import torch

        from .clip import create_clip
        from .learner import AlignConfig, derive_seed
        from .state import load_learner

        ident = manifest["model"]
        weights = ident.get("weights_id", "")
        model_seed = int(weights.split("seed=")[1]) if weights.startswith("random:seed=") else 0
        clip = create_clip(ident["model"], ident.get("pretrained"), "cpu", model_seed)
        old = _head_meta(src)
        align_cfg = AlignConfig(**old.get("align", {}))
        if epochs is not None:
            align_cfg.epochs = epochs
        if lr is not None:
            align_cfg.lr = lr
        learner, _ = load_learner(src, clip, align_cfg)
        timings["load"] = time.perf_counter() - t0

        # 3. generators for the new classes
        t0 = time.perf_counter()
        version = max([head.version, *version_dirs(root)]) + 1
        known_ids = list(learner.class_ids) + [int(c) for c in old.get("future_class_ids", [])]
        new_ids = [max(known_ids, default=-1) + 1 + k for k in range(len(names))]
        learner.add_classes(new_ids, names, derive_seed(seed, version, 1))
        if passes is not None:
            learner.gen_cfg.passes = passes
        x = torch.from_numpy(np.concatenate(feats)).float()
        y = torch.tensor([new_ids[k] for k in labels])
        stats = learner.fit_generators(new_ids, x, y, seed=derive_seed(seed, version, 3))
        if store_precision == "fp16":  # align on exactly what the store will hold (old groups and new)
            with torch.no_grad():
                for group in learner.store:
                    for t in group.state_dict().values():
                        if t.is_floating_point():
                            t.copy_(t.half().float())
        timings["generators"] = time.perf_counter() - t0
        report(f"  fitted {learner.gen_cfg.kind} generators for {len(names)} class(es) in {timings['generators']:.1f}s")

        # 4. realign all prompts on replay from the store
        t0 = time.perf_counter()
        align_stats = learner.align(learner.replay_source(), seed=derive_seed(seed, version, 2))
        timings["alignment"] = time.perf_counter() - t0
        report(f"  realigned {learner.prompts.num_classes} prompts ({align_cfg.epochs} epochs) in {timings['alignment']:.1f}s")

        # 5. write the new version
        t0 = time.perf_counter()
        from export.onnx_export import prompt_context

        from .artifacts import tensors_to_bytes

        learned_keys = learner.head().float().cpu().numpy()
        zs_names = [n for n in old.get("zero_shot_class_names", []) if n in head.class_names and n not in names]
        zs_rows = [head.class_names.index(n) for n in zs_names]
        keys = np.concatenate([learned_keys, head.keys[zs_rows]]) if zs_rows else learned_keys
        keep_future = [i for i, n in enumerate(head.future_names) if n not in names]
        future = head.future_keys[keep_future] if keep_future else np.zeros((0, keys.shape[1]), np.float32)
        meta = dict(old)
        meta.update({
            "head_version": version,
            "class_ids": list(learner.class_ids) + [-1] * len(zs_names),
            "class_names": list(learner.class_names) + zs_names,
            "future_class_ids": [old["future_class_ids"][i] for i in keep_future] if old.get("future_class_ids") else [],
            "future_class_names": [head.future_names[i] for i in keep_future],
            "zero_shot_class_names": zs_names,
            "align": align_cfg.to_dict(),
            "update": {"kind": "images", "added": names, "class_ids": new_ids, "images": counts,
                       "from_version": head.version, "seed": seed, "store_precision": store_precision,
                       "generator_passes": learner.gen_cfg.passes, "generator_stats": _jsonable(stats),
                       "align_stats": align_stats, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        })
        store_tensors, index = learner.store_state()
        if store_precision == "fp16":
            store_tensors = {k: v.half() if v.is_floating_point() else v for k, v in store_tensors.items()}
        store_meta = json.loads((src / "store.json").read_text())
        old_groups = {g["group"]: g for g in store_meta.get("groups", [])}
        for entry in index:  # keep what earlier updates recorded about their classes' data
            for key in ("images", "image_bytes"):
                if key in old_groups.get(entry["group"], {}):
                    entry[key] = old_groups[entry["group"]][key]
        index[-1]["images"] = dict(zip(map(str, new_ids), counts))
        index[-1]["image_bytes"] = dict(zip(map(str, new_ids), image_bytes))
        store_meta.update({"groups": index, "precision": store_precision})
        store_meta["generator"]["passes"] = store_meta["generator"].get("passes", learner.gen_cfg.passes)
        prompts_meta = {"n_ctx": learner.prompts.n_ctx, "class_ids": learner.class_ids, "class_names": learner.class_names}
        blobs = {
            "prompts.safetensors": tensors_to_bytes(learner.prompts.learned_state()),
            "prompts.json": json_bytes(prompts_meta),
            "store.safetensors": tensors_to_bytes(store_tensors),
            "store.json": json_bytes(store_meta),
            "prompt_context.safetensors": tensors_to_bytes({"context": prompt_context(learner),
                                                            "tokens": learner.prompts.tokens.cpu()}),
        }

        def write(d: Path) -> None:
            for name, blob in blobs.items():
                (d / name).write_bytes(blob)
            _write_head(d, keys, future, meta)

        final = publish_head(root, version, write, _manifest_model(src, manifest))
        timings["write"] = time.perf_counter() - t0
    report(f"published {final.name}: {len(meta['class_names'])} classes")
    return {"version": version, "directory": str(final), "added": names, "class_ids": new_ids,
            "timings": timings, "images": counts}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


# ---------------------------------------------------------------- store sizes (torch-free)

def _tensor_bytes(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes) from a safetensors header, without loading the data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()
            if k != "__metadata__"}


def store_info(bundle: str | os.PathLike, images_per_class: Optional[int] = None,
               bytes_per_image: Optional[float] = None) -> dict[str, Any]:
    """Bytes per class of each part of the current head version, vs keeping raw features or raw images.

    Parts per class: `generator` (its share of its task group in store.safetensors), `prompt` (its
    context vectors and z_c in prompts.safetensors), `context` (its row of prompt_context.safetensors)
    and `key` (its row of head.safetensors). Shared: the context generator g and the JSON files.
    Raw features = images x D x 4 bytes; raw images = the encoded bytes of the images an update was
    given (recorded in store.json), or --images-per-class / --bytes-per-image for classes without a record.
    """
    from runtime.bundle import load_head

    head = load_head(bundle)
    d = head.directory
    dim = int(head.keys.shape[1]) if head.keys.size else int(head.identity.get("embed_dim", 0))
    store_meta = json.loads((d / "store.json").read_text()) if (d / "store.json").exists() else {"groups": []}
    store = _tensor_bytes(d / "store.safetensors") if (d / "store.safetensors").exists() else {}
    prompts = _tensor_bytes(d / "prompts.safetensors") if (d / "prompts.safetensors").exists() else {}
    context = _tensor_bytes(d / "prompt_context.safetensors") if (d / "prompt_context.safetensors").exists() else {}
    keys = _tensor_bytes(d / "head.safetensors")
    pmeta = json.loads((d / "prompts.json").read_text()) if (d / "prompts.json").exists() else {"class_ids": [], "class_names": []}
    id_to_name = dict(zip(pmeta["class_ids"], pmeta["class_names"]))
    n_learned = len(pmeta["class_ids"])

    def per_row(tensors: dict, rows: int, names: Optional[Sequence[str]] = None) -> float:
        return sum(b for k, (shape, b) in tensors.items() if (names is None or k in names) and shape and shape[0] == rows) / max(rows, 1)

    prompt_row = per_row(prompts, n_learned, ["ctx", "zero_shot"])
    shared_g = sum(b for k, (_, b) in prompts.items() if k.startswith("generator."))
    context_row = per_row(context, n_learned)
    key_row = keys["keys"][1] / max(len(head.class_names), 1)
    classes, precision = [], store_meta.get("precision", "fp32")
    for g in store_meta.get("groups", []):
        ids = [int(c) for c in g["class_ids"]]
        group_bytes = sum(b for k, (_, b) in store.items() if k.startswith(f"group{g['group']}."))
        for c in ids:
            n = g.get("images", {}).get(str(c), images_per_class)
            raw = g.get("image_bytes", {}).get(str(c))
            if raw is None and n is not None and bytes_per_image is not None:
                raw = n * bytes_per_image
            row = {"class": id_to_name.get(c, str(c)), "class_id": c, "generator": g.get("kind", ""),
                   "generator_bytes": group_bytes / len(ids), "prompt_bytes": prompt_row,
                   "context_bytes": context_row, "key_bytes": key_row}
            row["total_bytes"] = row["generator_bytes"] + prompt_row + context_row + key_row
            row["images"] = n
            row["raw_features_bytes"] = n * dim * 4 if n is not None else None
            row["raw_images_bytes"] = raw
            classes.append(row)
    for name in head.class_names[n_learned:]:
        classes.append({"class": name, "class_id": -1, "generator": "zero-shot", "generator_bytes": 0,
                        "prompt_bytes": 0, "context_bytes": 0, "key_bytes": key_row, "total_bytes": key_row,
                        "images": None, "raw_features_bytes": None, "raw_images_bytes": None})
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    return {"bundle": str(bundle), "head_version": head.version, "directory": str(d), "embed_dim": dim,
            "store_precision": precision, "generator": store_meta.get("generator", {}).get("kind"),
            "classes": classes, "shared_bytes": {"context_generator_g": shared_g},
            "files": files, "total_bytes": sum(files.values())}
