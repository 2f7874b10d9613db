"""`cgil train`: a class-incremental run, task by task, for one method.

scenario -> features (cached) -> [generators] -> alignment -> head -> scores, with the learner
state published after every task so that --resume continues from the last finished one.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed
from runtime.artifacts import atomic_write_json, read_json
from .clip import FrozenClip, create_clip
from .config import METHODS, TrainConfig, differences
from .data import ImageDataset, get_dataset
from runtime.errors import CgilError
from .evaluate import score_step
from .features import default_cache_dir, task_features
from .generators import generator_class
from .learner import Learner, derive_seed
from .metrics import COLLAPSE_RATIO, summarize
from .progress import Reporter
from .scenario import Scenario, task_sizes
from .state import head_payload, load_learner, save_state, state_dir

PHASES = ("features", "generators", "alignment", "eval")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("cgil", "torch", "open_clip_torch", "numpy", "safetensors", "onnx", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_scenario(cfg: TrainConfig, dataset: ImageDataset) -> Scenario:
    n = dataset.num_classes
    if cfg.tasks is not None:
        sizes = task_sizes(n, cfg.tasks)
    else:
        sizes = dataset.task_sizes or task_sizes(n, min(5, n))
    return Scenario.build(n, sizes, cfg.seed)


def resolve_device(device: str) -> str:
    """`auto`: cuda when torch sees a GPU, else cpu; other names pass through unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def validate(cfg: TrainConfig) -> None:
    cfg.device = resolve_device(cfg.device)
    if cfg.method not in METHODS:
        raise CgilError(f"unknown method {cfg.method!r}; choose one of: {', '.join(METHODS)}, all")
    generator_class(cfg.generator.kind)
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise CgilError(f"unknown device {cfg.device!r}; choose one of: auto, cpu, cuda")


def deterministic_cuda(device: str) -> None:
    """Make CUDA training repeatable, which --resume's "same metrics, bit for bit" needs.

    On the CPU every kernel cgil uses is deterministic already. On CUDA, attention's backward pass
    and cuBLAS's split-K reductions are not by default: deterministic algorithms are switched on and
    cuBLAS gets a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its first handle is made, so
    this runs before the model is created). warn_only: an op without a deterministic CUDA kernel
    warns with its name instead of stopping the run; `cgil bench gpu` checks resume on CUDA.

    warn_only would also let scaled_dot_product_attention keep its flash / memory-efficient / cuDNN
    kernels, whose backward passes accumulate in a run-dependent order: the prompts' gradients flow
    through the text tower's attention, so only the math kernel (matmuls + softmax, deterministic
    under the settings above) is left on. Slower attention, but resume is promised exact.
    """
    if not str(device).startswith("cuda"):
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(False)
    cuda.enable_mem_efficient_sdp(False)
    if hasattr(cuda, "enable_cudnn_sdp"):
        cuda.enable_cudnn_sdp(False)
    cuda.enable_math_sdp(True)


@dataclass
class RunContext:
    cfg: TrainConfig
    out: Path
    dataset: ImageDataset
    scenario: Scenario
    clip: FrozenClip
    cache_dir: Optional[Path]
    reporter: Reporter
    timings: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    # process CPU seconds of the generator fits and the alignments: with one thread, the work done, whatever
    # else shares the cores (`cgil bench update` splits a whole run into fit, alignment and the rest with it)
    cpu_timings: dict[str, float] = field(default_factory=lambda: {"generators": 0.0, "alignment": 0.0})

    def features(self, split: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        with self.reporter.phase(f"task {t + 1}: {split} features") as bar:
            out = task_features(self.clip, self.dataset, split, self.scenario.task_classes(t), self.cache_dir,
                                self.cfg.feature_batch_size, bar)
        self.timings["features"] += time.perf_counter() - start
        return out


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """`images per class (train/test): coins 30/10, keys 28/9` (a summary past 20 classes)."""
    names = list(counts["train"])
    if len(names) <= 20:
        return "images per class (train/test): " + ", ".join(
            f"{n} {counts['train'][n]}/{counts['test'][n]}" for n in names)
    train = sorted(counts["train"].values())
    return (f"{len(names)} classes, {sum(train)} training images ({train[0]}-{train[-1]} per class), "
            f"{sum(counts['test'].values())} test images; per class in config.json")


def prepare(cfg: TrainConfig, out: Path, resume: bool, reporter: Reporter, cache_dir: Optional[Path],
            strict: bool = False) -> RunContext:
    validate(cfg)
    deterministic_cuda(cfg.device)
    dataset = get_dataset(cfg.dataset, cfg.data_dir, val_split=cfg.val_split, strict=strict)
    counts = dataset.class_counts()
    reporter.log(describe_counts(counts))
    if dataset.meta.get("held_out"):  # a folder without test/: say where the test images come from
        reporter.log(f"no test/ folder: {dataset.meta['held_out']} (seeded; --val-split to change the share)")
    scenario = build_scenario(cfg, dataset)
    config_path = out / "config.json"
    has_state = (out / "state" / "CURRENT").exists()
    if has_state and not resume:
        raise CgilError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume:
        if not config_path.exists():
            raise CgilError(f"nothing to resume: {config_path} does not exist")
        diffs = differences(read_json(config_path)["settings"], cfg.to_dict())
        if diffs:
            raise CgilError(f"--resume refused, settings differ from the run in {out}: " + "; ".join(diffs))
    clip = create_clip(cfg.model, cfg.pretrained, cfg.device, cfg.model_seed)
    # The run directory appears only now that settings, data and weights have all been accepted:
    # a refused run leaves nothing behind.
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        reporter.attach_log(out / "train.log")
    if (not resume or not config_path.exists()) and distributed.is_main():
        atomic_write_json(config_path, {
            "settings": cfg.to_dict(),
            "dataset_id": dataset.dataset_id,
            "class_names": dataset.classnames,
            "class_counts": counts,
            "class_order": list(scenario.order),
            "tasks": scenario.tasks(),
            "model_identity": clip.identity.to_dict(),
            "versions": package_versions(),
        })
    return RunContext(cfg, out, dataset, scenario, clip, cache_dir, reporter)


def learn_task(ctx: RunContext, learner: Learner, t: int, train: tuple[torch.Tensor, torch.Tensor],
               seen_train: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """Learn task t; returns the replay quality of each newly fitted class (empty without generators)."""
    cfg, classes = ctx.cfg, ctx.scenario.task_classes(t)
    learner.add_classes(classes, [ctx.dataset.classnames[c] for c in classes], derive_seed(cfg.seed, t, 1))
    quality: dict[str, dict] = {}
    if cfg.method == "zeroshot":
        return quality
    if cfg.method == "cgil":
        gen_seed = cfg.seed if cfg.generator.seed is None else cfg.generator.seed
        start, cpu = time.perf_counter(), time.process_time()
        with ctx.reporter.phase(f"task {t + 1}: fit {cfg.generator.kind} x{len(classes)}") as bar:
            learner.fit_generators(classes, *train, seed=gen_seed, progress=bar)
        ctx.timings["generators"] += time.perf_counter() - start
        ctx.cpu_timings["generators"] += time.process_time() - cpu
        quality = learner.replay_quality(learner.store[-1], *train, seed=gen_seed)
        collapse_warning(ctx, quality)
        source = learner.replay_source()
    elif cfg.method == "joint":
        source = Learner.real_source(torch.cat([f for f, _ in seen_train]), torch.cat([l for _, l in seen_train]))
    else:  # sequential: only the current task's data, no replay
        source = Learner.real_source(*train)
    start, cpu = time.perf_counter(), time.process_time()
    with ctx.reporter.phase(f"task {t + 1}: align {learner.prompts.num_classes} prompts") as bar:
        learner.align(source, seed=derive_seed(cfg.seed, t, 2), progress=bar)
    ctx.timings["alignment"] += time.perf_counter() - start
    ctx.cpu_timings["alignment"] += time.process_time() - cpu
    return quality


def collapse_warning(ctx: RunContext, quality: dict[str, dict]) -> None:
    """Name the classes whose replay collapsed and say what to try (the ratio is real/real ~1 even at n = 5,
    so a flag means the generator, not the small sample: docs/training.md)."""
    flagged = {c: q for c, q in quality.items() if q["collapsed"]}
    if not flagged:
        return
    g = ctx.cfg.generator
    names = ", ".join(f"{ctx.dataset.classnames[int(c)]!r} ({q['variance_ratio']:.0%}, {q['n_real']} images)"
                      for c, q in flagged.items())
    ctx.reporter.log(f"warning: the {g.kind} replay of {names} carries under {COLLAPSE_RATIO:.0%} of the real "
                     f"features' variance (collapsed generator), so these classes will be forgotten sooner; try "
                     f"more images per class, more generator steps (--passes, now {g.passes} per batch of "
                     f"{g.batch_size}), or --generator gauss")


def keys_for_method(cfg: TrainConfig, learner: Learner) -> torch.Tensor:
    if cfg.method == "zeroshot":
        return torch.nn.functional.normalize(learner.prompts.zero_shot.detach(), dim=-1)
    return learner.head()


def run(cfg: TrainConfig, out: Path, resume: bool = False, stop_after: Optional[int] = None,
        reporter: Optional[Reporter] = None, cache_dir: Optional[Path] = None,
        strict: bool = False, plots: bool = True) -> Optional[dict[str, Any]]:
    """Train one method over all tasks. Returns the metrics, or None when stopped early by `stop_after`.

    `strict`: abort on an unreadable image of a folder: dataset instead of skipping it with a warning.
    `plots`: also render the PNG figures (matplotlib: ~0.7 CPU-s); the CSV and JSON reports are always written.
    """
    reporter = reporter or Reporter()
    if distributed.init_from_env(resolve_device(cfg.device)) and not distributed.is_main():
        reporter = Reporter(enabled=False)  # torchrun: rank 0 alone prints and writes run files
    out = Path(out)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    ctx = prepare(cfg, out, resume, reporter, cache_dir, strict=strict)
    sc, ds = ctx.scenario, ctx.dataset
    torch.manual_seed(cfg.seed)

    tests = [ctx.features("test", k) for k in range(sc.num_tasks)]
    rows: dict[str, list] = {"accuracy_matrix": [], "task_il_matrix": [], "transfer_matrix": [],
                             "transfer_unnormalised_matrix": [], "timings_per_task": []}
    start_task = 0
    saved = state_dir(out) if resume else None
    if saved is not None:
        learner, progress = load_learner(saved, ctx.clip, cfg.align)
        rows = progress["rows"]
        ctx.timings = progress["timings"]
        ctx.cpu_timings = progress.get("cpu_timings", ctx.cpu_timings)
        start_task = progress["finished_task"] + 1
        reporter.log(f"resuming {out} after task {start_task} of {sc.num_tasks}")
    else:
        learner = Learner(ctx.clip, cfg.generator, cfg.align, n_ctx=cfg.n_ctx)
    zero_shot = learner.text.zero_shot(ds.classnames).cpu()

    seen_train = [ctx.features("train", k) for k in range(start_task)] if cfg.method == "joint" else []
    for t in range(start_task, sc.num_tasks):
        before = dict(ctx.timings)
        train = ctx.features("train", t)
        if cfg.method == "joint":
            seen_train.append(train)
        quality = learn_task(ctx, learner, t, train, seen_train)
        if quality:
            rows.setdefault("replay_quality", {}).update(quality)
        start = time.perf_counter()
        scores = score_step(keys_for_method(cfg, learner), learner.class_ids, zero_shot, tests, sc.tasks(), t)
        ctx.timings["eval"] += time.perf_counter() - start
        rows["accuracy_matrix"].append(scores.class_il)
        rows["task_il_matrix"].append(scores.task_il)
        rows["transfer_matrix"].append(scores.transfer)
        rows["transfer_unnormalised_matrix"].append(scores.transfer_unnormalised)
        rows["timings_per_task"].append({k: round(ctx.timings[k] - before[k], 4) for k in PHASES})
        future = sc.order[sc.offsets[t + 1]:]
        head = head_payload(learner, list(future), [ds.classnames[c] for c in future],
                            zero_shot[list(future)] if future else torch.zeros(0), version=t + 1)
        if cfg.method == "zeroshot":
            head[0]["keys"] = keys_for_method(cfg, learner).cpu()
        if distributed.is_main():
            save_state(out, learner, t, {"rows": rows, "timings": ctx.timings, "cpu_timings": ctx.cpu_timings}, head)
        step = [a for a in scores.class_il if a is not None]
        reporter.log(f"[{cfg.method}] task {t + 1}/{sc.num_tasks}: class-IL accuracy {sum(step) / len(step):.2f}%")
        if stop_after is not None and t == stop_after and t < sc.num_tasks - 1:
            return None

    metrics = {
        "method": cfg.method,
        "generator": cfg.generator.kind if cfg.method == "cgil" else None,
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "seed": cfg.seed,
        "dataset": ds.name,
        "class_order": list(sc.order),
        "class_names": ds.classnames,
        "tasks": sc.tasks(),
        "task_test_sizes": [len(l) for _, l in tests],
        **{k: v for k, v in rows.items() if k != "timings_per_task"},
        **summarize(rows["accuracy_matrix"], [len(l) for _, l in tests], rows["transfer_matrix"],
                    rows["transfer_unnormalised_matrix"]),
        "conventions": {
            "final_avg_acc": "mean over tasks of the last row (reference convention)",
            "final_pooled_acc": "accuracy over all test samples pooled",
            "transfer": "future tasks scored over all classes, zero-shot keys L2-normalised (ours)",
            "transfer_unnormalised": "same with unnormalised zero-shot keys (reference implementation)",
        },
        "timings": ctx.timings,
        "cpu_timings": ctx.cpu_timings,
        "timings_per_task": rows["timings_per_task"],
    }
    from .report import write_class_report, write_run_report

    if distributed.is_main():
        write_run_report(out, metrics, plots=plots)
        final = keys_for_method(cfg, learner)
        feats, labels = torch.cat([f for f, _ in tests]), torch.cat([l for _, l in tests])
        pred = torch.tensor(learner.class_ids)[(torch.nn.functional.normalize(feats, dim=-1) @ final.cpu().t())
                                               .argmax(1)]
        write_class_report(out, ds.classnames, labels.tolist(), pred.tolist(), plots=plots)
    return metrics
