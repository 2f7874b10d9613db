"""On-device learning of new classes from images: the CGIL task update run against a bundle.

`update_from_images` runs four phases, each a function of its own:

  embed     the new images go through the bundle's own image engine (runtime.Classifier, ONNX
            Runtime), so the features are exactly what serving computes;
  load      torch, the frozen CLIP (for its text tower) and the learner state, rebuilt from the
            bundle's model identity and current head version;
  fit       the new classes' generators are fitted as one batched model (the store's family);
  align     the prompts of ALL classes are realigned on synthetic replay from the bundle's replay
            store (old classes) and the new generators;
  publish   a new head version (head + store + prompts + prompted-graph inputs) is published
            atomically through runtime.heads.

Name-only updates, rollback and store accounting need no torch: they live in runtime/.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cgil.choices import DEFAULT_SEED
from cgil.clip import create_clip
from cgil.learner import AlignConfig, Learner, derive_seed
from cgil.state import load_learner
from cgil.tensor_io import tensors_to_bytes
from runtime.artifacts import json_bytes
from runtime.bundle import BundleManifest, Head, load_head, open_bundle
from runtime.errors import CgilError
from runtime.format import (KEEP, PROMPT_CONTEXT, PROMPTS_META, PROMPTS_TENSORS, STORE_META, STORE_PRECISIONS,
                            STORE_TENSORS)
from runtime.names import clean_names, folder_class_name
from runtime.heads import (Report, check_new_names, head_meta, heads_root, learned_names, next_version, prune,
                           publish_head, successor_meta, update_lock, version_model, write_head_files)

from .onnx_export import prompt_context

PHASES = ("features", "load", "generators", "alignment", "write")


@dataclass
class NewImages:
    """The embedded images of the new classes: features (N, D), labels 0..K-1, per-class counts and bytes."""

    names: list[str]
    features: np.ndarray
    labels: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    image_bytes: list[int] = field(default_factory=list)


def class_folders(data: str | os.PathLike, strict: bool = False) -> list[tuple[str, list[Path]]]:
    """DIR/<class>/* -> [(class name, readable image files)], folder names with '_' read as spaces, sorted.

    Unreadable files follow `cgil train`'s rule (cgil.data.folder.report_unreadable): skipped with one
    warning, or all refused with `strict`; they count nowhere. Names follow the one name rule
    (runtime.names): a folder `_two` next to `two` is refused, not a second class.
    """
    from cgil.data.folder import class_dirs, image_files, readable, report_unreadable

    data = Path(data)
    if not data.is_dir():
        raise CgilError(f"--data {data} is not a directory (expected one folder of images per new class)")
    dirs, bad = class_dirs(data), []
    out = [(folder_class_name(d.name), readable(image_files(d), bad)) for d in dirs]
    report_unreadable(bad, data, strict)
    empty = [d for d, (_, files) in zip(dirs, out) if not files]
    if empty:
        raise CgilError("; ".join(f"empty class folder: {d} holds no readable images" for d in empty))
    if not out:
        raise CgilError(f"--data {data} holds no class folders")
    clean_names([n for n, _ in out], where=f"class folder in {data}")  # two folders, one name ignoring case
    return out


def embed_images(bundle: Path, folders: list[tuple[str, list[Path]]], report: Report) -> NewImages:
    from runtime.classifier import Classifier

    engine = Classifier(bundle, backend="onnxruntime")
    feats, out = [], NewImages([n for n, _ in folders], np.zeros(0, np.float32))
    for k, (name, files) in enumerate(folders):
        e = engine.embed(files)
        feats.append(e)
        out.labels += [k] * len(e)
        out.counts.append(len(files))
        out.image_bytes.append(sum(f.stat().st_size for f in files))
        report(f"  {name}: {len(files)} images embedded")
    out.features = np.concatenate(feats)
    return out


def load_bundle_learner(manifest: BundleManifest, src: Path, epochs: Optional[int],
                        lr: Optional[float], device: str = "cpu") -> tuple[Learner, AlignConfig]:
    """The learner of a head version, on `device`, with the recorded alignment settings unless overridden."""
    ident = manifest.identity
    clip = create_clip(ident.model, ident.pretrained, device, ident.random_seed)
    align_cfg = AlignConfig(**head_meta(src).get("align", {}))
    if epochs is not None:
        align_cfg.epochs = epochs
    if lr is not None:
        align_cfg.lr = lr
    learner, _ = load_learner(src, clip, align_cfg)
    return learner, align_cfg


def fit_new_classes(learner: Learner, images: NewImages, new_ids: list[int], passes: Optional[int], seed: int,
                    version: int, store_precision: str) -> dict[str, Any]:
    learner.add_classes(new_ids, images.names, derive_seed(seed, version, 1))
    if passes is not None:  # exactly the passes asked for, as `cgil train --passes`
        learner.gen_cfg.passes, learner.gen_cfg.min_steps = passes, 0
    x = torch.from_numpy(images.features).float()
    y = torch.tensor([new_ids[k] for k in images.labels])
    stats = learner.fit_generators(new_ids, x, y, seed=derive_seed(seed, version, 3))
    if store_precision == "fp16":  # align on exactly what the store will hold (old groups and new)
        with torch.no_grad():
            for group in learner.store:
                for t in group.state_dict().values():
                    if t.is_floating_point():
                        t.copy_(t.half().float())
    return stats


def _version_blobs(learner: Learner, src: Path, images: NewImages, new_ids: list[int],
                   store_precision: str) -> dict[str, bytes]:
    """The learner's files of the new version: prompts, replay store (with image records), graph inputs."""
    store_tensors, index = learner.store_state()
    if store_precision == "fp16":
        store_tensors = {k: v.half() if v.is_floating_point() else v for k, v in store_tensors.items()}
    store_meta = json.loads((src / STORE_META).read_text())
    old_groups = {g["group"]: g for g in store_meta.get("groups", [])}
    for entry in index:  # keep what earlier updates recorded about their classes' data
        for key in ("images", "image_bytes"):
            if key in old_groups.get(entry["group"], {}):
                entry[key] = old_groups[entry["group"]][key]
    index[-1]["images"] = dict(zip(map(str, new_ids), images.counts))
    index[-1]["image_bytes"] = dict(zip(map(str, new_ids), images.image_bytes))
    store_meta.update({"groups": index, "precision": store_precision})
    store_meta["generator"]["passes"] = store_meta["generator"].get("passes", learner.gen_cfg.passes)
    prompts_meta = {"n_ctx": learner.prompts.n_ctx, "class_ids": learner.class_ids, "class_names": learner.class_names}
    return {
        PROMPTS_TENSORS: tensors_to_bytes(learner.prompts.learned_state()),
        PROMPTS_META: json_bytes(prompts_meta),
        STORE_TENSORS: tensors_to_bytes(store_tensors),
        STORE_META: json_bytes(store_meta),
        PROMPT_CONTEXT: tensors_to_bytes({"context": prompt_context(learner), "tokens": learner.prompts.tokens.cpu()}),
    }


def publish_update(root: Path, version: int, learner: Learner, head: Head, manifest: BundleManifest,
                   images: NewImages, new_ids: list[int], update_record: dict[str, Any],
                   keep: int = KEEP) -> tuple[Path, dict]:
    src = head.directory
    old = head_meta(src)
    names = images.names
    learned_keys = learner.head().float().cpu().numpy()
    zs_names = [n for n in old.get("zero_shot_class_names", []) if n in head.class_names and n not in names]
    zs_rows = [head.class_names.index(n) for n in zs_names]
    keys = np.concatenate([learned_keys, head.keys[zs_rows]]) if zs_rows else learned_keys
    meta, future = successor_meta(head, old, version, list(learner.class_ids) + [-1] * len(zs_names),
                                  list(learner.class_names) + zs_names, zs_names, names,
                                  align=learner.align_cfg.to_dict(), update=update_record)
    blobs = _version_blobs(learner, src, images, new_ids, update_record["store_precision"])

    def write(d: Path) -> None:
        for name, blob in blobs.items():
            (d / name).write_bytes(blob)
        write_head_files(d, keys, future, meta)

    return publish_head(root, version, write, version_model(src, manifest.raw["model"]), keep=keep), meta


def update_from_images(bundle: str | os.PathLike, data: str | os.PathLike, epochs: Optional[int] = None,
                       lr: Optional[float] = None, passes: Optional[int] = None, seed: int = DEFAULT_SEED,
                       store_precision: str = "fp32", report: Report = lambda s: None,
                       device: str = "auto", keep: int = KEEP, strict: bool = False) -> dict[str, Any]:
    """Learn the classes in DATA/<class>/ and publish a new head version. Returns timings and the version.

    `device` runs the generators and the alignment (text tower) there: auto (cuda when present, as
    `cgil train`), cpu, cuda or cuda:N. What is published is the same files either way (tensors are
    written from the CPU). `strict`: refuse unreadable images instead of skipping them with a warning. `keep`: head versions
    kept on disk after publishing (keep - 1 rollbacks remain possible).
    """
    if store_precision not in STORE_PRECISIONS:
        raise CgilError(f"unknown store precision {store_precision!r}; choose one of: {', '.join(STORE_PRECISIONS)}")
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise CgilError(f"unknown device {device!r}; choose one of: auto, cpu, cuda, cuda:N")
    from cgil.train import resolve_device

    device = resolve_device(device)
    bundle = Path(bundle)
    timings = {p: 0.0 for p in PHASES}
    folders = class_folders(data, strict)
    names = [n for n, _ in folders]
    manifest = open_bundle(bundle)
    root = heads_root(bundle)
    with update_lock(root):
        prune(root)
        head = load_head(bundle, manifest.identity)
        src = head.directory
        learned = learned_names(src)
        if not (src / STORE_META).exists() or not learned:
            raise CgilError(f"{src} holds no replay store / prompts: an image update needs a bundle exported from a CGIL run")
        names = check_new_names(names, head.class_names, learned, allow_zero_shot=True)

        t0 = time.perf_counter()
        report(f"embedding {sum(len(f) for _, f in folders)} images of {len(names)} new class(es) with the bundle's image engine")
        images = embed_images(bundle, folders, report)
        timings["features"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        report("loading the text tower and the replay store (torch, open_clip)")
        learner, align_cfg = load_bundle_learner(manifest, src, epochs, lr, device)
        timings["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        version = next_version(root, head.version)
        known_ids = list(learner.class_ids) + [int(c) for c in head_meta(src).get("future_class_ids", [])]
        new_ids = [max(known_ids, default=-1) + 1 + k for k in range(len(names))]
        report(f"fitting {learner.gen_cfg.kind} generators for {len(names)} class(es)")
        stats = fit_new_classes(learner, images, new_ids, passes, seed, version, store_precision)
        timings["generators"] = time.perf_counter() - t0
        report(f"  fitted {learner.gen_cfg.kind} generators for {len(names)} class(es) in {timings['generators']:.1f}s")

        t0 = time.perf_counter()
        report(f"realigning {learner.prompts.num_classes} prompts on replay ({align_cfg.epochs} epochs)")
        align_stats = learner.align(learner.replay_source(), seed=derive_seed(seed, version, 2))
        timings["alignment"] = time.perf_counter() - t0
        report(f"  realigned {learner.prompts.num_classes} prompts ({align_cfg.epochs} epochs) in {timings['alignment']:.1f}s")

        t0 = time.perf_counter()
        record = {"kind": "images", "added": names, "class_ids": new_ids, "images": images.counts,
                  "from_version": head.version, "seed": seed, "store_precision": store_precision, "device": device,
                  "generator_passes": learner.gen_cfg.passes, "generator_stats": _jsonable(stats),
                  "align_stats": align_stats, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        final, meta = publish_update(root, version, learner, head, manifest, images, new_ids, record, keep=keep)
        timings["write"] = time.perf_counter() - t0
    report(f"published head v{version} ({final}): {len(meta['class_names'])} classes, added {', '.join(names)}")
    return {"version": version, "directory": str(final), "added": names, "class_ids": new_ids,
            "timings": timings, "images": images.counts}


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
