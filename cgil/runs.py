"""Reading saved runs back: `cgil eval` and `cgil info`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from runtime.artifacts import read_json, verify_manifest

from cgil.tensor_io import load_tensors
from .clip import create_clip
from .config import TrainConfig
from .data import get_dataset
from runtime.errors import CgilError
from .features import default_cache_dir, task_features
from .state import check_identity, state_dir
from .text import normalize


def method_runs(run_dir: Path) -> dict[str, Path]:
    """The runs inside a `--method all` directory (one sub-directory per method), by method."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(run_dir.iterdir()) if (p / "config.json").is_file()}


def open_run(run_dir: Path) -> tuple[dict, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        inside = method_runs(run_dir)
        if inside:
            raise CgilError(f"{run_dir} holds one run per method ({', '.join(inside)}); "
                            f"give one of them, e.g. {run_dir / next(iter(inside))}")
        raise CgilError(f"{run_dir} is not a cgil run (no config.json)")
    current = state_dir(run_dir)
    if current is None:
        raise CgilError(f"{run_dir} has no finished task yet (no state/CURRENT)")
    return read_json(run_dir / "config.json"), current


def eval_device(trained_on: str, device: Optional[str] = None) -> str:
    """Where to re-evaluate: `device` if given, else the run's device, else the CPU when the run was
    trained on a GPU this machine lacks (the saved head and features are device-independent)."""
    if device:
        return device
    if trained_on.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return trained_on


def evaluate_run(run_dir: Path, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                 device: Optional[str] = None) -> dict[str, Any]:
    config, current = open_run(run_dir)
    cfg = TrainConfig.from_dict(config["settings"])
    cfg.device = eval_device(cfg.device, device)
    verify_manifest(current)
    head_meta = read_json(current / "head.json")
    keys = load_tensors(current / "head.safetensors")["keys"]
    clip = create_clip(cfg.model, cfg.pretrained, cfg.device, cfg.model_seed)
    check_identity(head_meta["model"], clip, current)
    ds = get_dataset(dataset or cfg.dataset, data_dir if dataset else (data_dir or cfg.data_dir),
                     val_split=None if dataset else cfg.val_split)

    by_name = {n: i for i, n in enumerate(head_meta["class_names"])}
    unknown = [n for n in ds.classnames if n not in by_name]
    if dataset and unknown:
        raise CgilError(f"classes not learned by this run: {', '.join(unknown)}")
    tasks = config["tasks"] if not dataset else [[c for c in range(ds.num_classes)]]
    per_task, correct, total = {}, 0, 0
    for k, classes in enumerate(tasks):
        classes = [c for c in classes if ds.classnames[c] in by_name]
        if not classes:
            continue
        feats, labels = task_features(clip, ds, "test", classes, default_cache_dir())
        cols = torch.tensor([by_name[ds.classnames[int(l)]] for l in labels])
        pred = (normalize(feats) @ keys.t()).argmax(1)
        hits = int((pred == cols).sum())
        per_task[f"task {k + 1}"] = 100.0 * hits / len(labels)
        correct, total = correct + hits, total + len(labels)
    accs = list(per_task.values())
    return {
        "method": cfg.method,
        "final_avg_acc": sum(accs) / len(accs),
        "final_pooled_acc": 100.0 * correct / total,
        "per_task": per_task,
        "head_version": head_meta["head_version"],
    }


def run_info(run_dir: Path) -> dict[str, Any]:
    """What a run holds; for a `--method all` directory, the same for each method inside."""
    inside = method_runs(run_dir)
    if inside and not (Path(run_dir) / "config.json").exists():
        return {"run": str(run_dir), "methods": {m: run_info(p) for m, p in inside.items()}}
    config, current = open_run(run_dir)
    manifest = verify_manifest(current)
    head_meta = read_json(current / "head.json")
    store = read_json(current / "store.json")
    sizes = {name: info["bytes"] for name, info in manifest["files"].items()}
    n = max(1, len(head_meta["class_names"]))
    return {
        "run": str(run_dir),
        "method": config["settings"]["method"],
        "model": config["model_identity"],
        "state_version": current.name,
        "head_version": head_meta["head_version"],
        "classes": head_meta["class_names"],
        "images_per_class": config.get("class_counts"),
        "future_classes": head_meta.get("future_class_names", []),
        "generator": store["generator"]["kind"],
        "bytes": sizes,
        "bytes_total": sum(sizes.values()),
        "replay_store_bytes_per_class": sizes.get("store.safetensors", 0) / n,
        "replay_quality": replay_quality_summary(current, config.get("class_names")),
    }


def replay_quality_summary(current: Path, class_names: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """Per fitted class: variance ratio and Frechet distance of its replay against its real features
    (recorded at fit time), the means, and the classes whose replay collapsed. None for runs without
    generators or written before this was recorded."""
    progress = read_json(current / "progress.json") if (current / "progress.json").exists() else {}
    per_class = progress.get("rows", {}).get("replay_quality")
    if not per_class:
        return None
    ratios = [q["variance_ratio"] for q in per_class.values()]
    fds = [q["frechet"] for q in per_class.values()]
    return {
        "mean_variance_ratio": sum(ratios) / len(ratios),
        "min_variance_ratio": min(ratios),
        "mean_frechet": sum(fds) / len(fds),
        "max_frechet": max(fds),
        "collapsed_classes": [c for c, q in per_class.items() if q["collapsed"]],
        "collapsed_class_names": [class_names[int(c)] for c, q in per_class.items() if q["collapsed"]]
        if class_names else None,
        "per_class": per_class,
    }
