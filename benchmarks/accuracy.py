"""`cgil bench accuracy`: CGIL with each generator against zero-shot, joint and sequential prompt tuning.

Every method is a full class-incremental run of `cgil.train.run` (same scenario, seeds and features).
Default: digits with the tiny model (runs offline on a CPU). Any `folder:PATH` dataset and any open_clip
model/weights can be given. Writes the summary table (JSON + markdown), one accuracy-matrix heatmap PNG
per method and one PNG of per-task accuracy curves next to the JSON.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from benchmarks.common import add_out_option, add_threads_option, apply_threads, log, machine, markdown_table, write_results
from cgil.choices import DEFAULT_SEED, GENERATOR_KINDS, METHODS

GENERATORS = GENERATOR_KINDS
BASELINES = tuple(m for m in METHODS if m != "cgil")
COLUMNS = ["run", "final_avg_acc", "final_pooled_acc", "avg_incremental_acc", "forgetting", "transfer",
           "transfer_unnormalised", "fit_s", "align_s", "total_s"]


def dataset_tag(dataset: str, model: str) -> str:
    name = Path(dataset[len("folder:"):]).name if dataset.startswith("folder:") else dataset
    return re.sub(r"[^a-z0-9]+", "-", f"{name}-{model}".lower()).strip("-")


def curves_png(results: dict[str, dict[str, Any]], title: str) -> bytes:
    """Left: average class-IL accuracy over seen tasks after each task, every method. Right: one small
    panel per method with the accuracy on each task k as training goes on (A[t][k], t >= k)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cgil.metrics import step_accuracies

    names = list(results)
    cols = 4
    rows = 1 + (len(names) + cols - 1) // cols
    fig = plt.figure(figsize=(3.2 * cols, 2.6 * rows), dpi=110)
    ax = fig.add_subplot(rows, 1, 1)
    for name in names:
        acc = results[name]["accuracy_matrix"]
        ax.plot(range(1, len(acc) + 1), step_accuracies(acc), marker="o", label=name)
    ax.set_xticks(range(1, max(len(m["accuracy_matrix"]) for m in results.values()) + 1))
    ax.set_xlabel("after task")
    ax.set_ylabel("class-IL acc., seen tasks (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(title, fontsize=9)
    for i, name in enumerate(names):
        sub = fig.add_subplot(rows, cols, cols + i + 1)
        acc = results[name]["accuracy_matrix"]
        num = len(acc)
        for k in range(num):
            ts = list(range(k, num))
            sub.plot([t + 1 for t in ts], [acc[t][k] for t in ts], marker=".", label=f"task {k + 1}")
        sub.set_ylim(0, 100)
        sub.set_xlim(0.5, num + 0.5)
        sub.set_xticks(range(1, num + 1))
        sub.set_title(name, fontsize=8)
        sub.tick_params(labelsize=7)
        if i == 0:
            sub.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cgil bench accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", help="digits (default), a registered name, or folder:PATH")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None, help="open_clip architecture (default cgil-tiny)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file (default random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--generators", nargs="+", default=list(GENERATORS), help="CGIL generators to run")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="baselines to run")
    p.add_argument("--passes", type=int, default=None, help="VAE/diffusion passes (default: dataset preset)")
    p.add_argument("--epochs", type=int, default=None, help="alignment epochs (default: dataset preset)")
    p.add_argument("--tasks", type=int, default=None, help="number of tasks (default: dataset's split)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--quick", action="store_true", help="tiny budgets (seconds): a smoke run, not a measurement")
    p.add_argument("--runs-dir", type=Path, default=None, help="keep the run directories here (default: temporary)")
    add_threads_option(p)
    add_out_option(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from cgil.clip import DEFAULT_MODEL
    from cgil.config import TrainConfig
    from cgil.progress import Reporter
    from cgil.report import heatmap_png
    from cgil.train import run

    args = parse(argv)
    apply_threads(args.threads)
    model = args.model or DEFAULT_MODEL
    plan = [("cgil", g) for g in args.generators] + [(b, None) for b in args.baselines]
    passes = args.passes or (2 if args.quick else None)
    epochs = args.epochs or (2 if args.quick else None)
    tmp = None
    runs_dir = args.runs_dir
    if runs_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cgil-bench-accuracy-")
        runs_dir = Path(tmp.name)
    results: dict[str, dict[str, Any]] = {}
    rows = []
    settings = None
    try:
        for method, generator in plan:
            name = f"cgil-{generator}" if generator else method
            overrides: dict[str, Any] = {"method": method, "model": model, "seed": args.seed, "device": args.device}
            if generator:
                overrides["generator"] = generator
            for key in ("pretrained", "data_dir", "tasks"):
                if getattr(args, key) is not None:
                    overrides[key] = getattr(args, key)
            cfg = TrainConfig.for_dataset(args.dataset, **overrides)
            if passes:
                cfg.generator.passes = passes
            if epochs:
                cfg.align.epochs = epochs
            if args.quick:
                cfg.generator.em_steps = 5
            settings = settings or {"dataset": args.dataset, "model": model, "pretrained": args.pretrained,
                                    "seed": args.seed, "passes": cfg.generator.passes, "epochs": cfg.align.epochs,
                                    "align_lr": cfg.align.lr, "samples_per_class": cfg.align.samples_per_class}
            log(f"{name}: training ({args.dataset}, {model})")
            start = time.perf_counter()
            metrics = run(cfg, runs_dir / name, reporter=Reporter(enabled=False))
            total = time.perf_counter() - start
            results[name] = metrics
            timings = metrics.get("timings", {})
            row = {"run": name, **{k: metrics.get(k) for k in COLUMNS[1:-3]},
                   "fit_s": timings.get("generators"), "align_s": timings.get("alignment"), "total_s": total}
            rows.append(row)
            log(f"  final avg acc {row['final_avg_acc']:.2f}%  pooled {row['final_pooled_acc']:.2f}%  {total:.1f}s")
    finally:
        if tmp is not None:
            tmp.cleanup()

    tag = dataset_tag(args.dataset, model)
    command = "cgil bench accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    first = next(iter(results.values()))
    meta = {
        "command": command.strip(),
        "threads": torch.get_num_threads(),
        "settings": settings,
        "class_order": first.get("class_order"),
        "tasks": first.get("tasks"),
        "conventions": first.get("conventions"),
        "matrices": {name: {"accuracy_matrix": m["accuracy_matrix"], "task_il_matrix": m.get("task_il_matrix")}
                     for name, m in results.items()},
        "notes": ["accuracies in percent, class-IL; final_avg_acc = mean over tasks of the last row (reference "
                  "convention), final_pooled_acc = over all test samples",
                  "transfer: future tasks scored over all classes with L2-normalised zero-shot keys (ours); "
                  "transfer_unnormalised: the reference implementation's variant",
                  "fit_s / align_s: time in generator fitting / alignment (train.run's timings); GPU: not measured"],
    }
    path = write_results(f"accuracy-{tag}", rows, meta, out_dir=args.out_dir, columns=COLUMNS)
    stem = path.with_suffix("")
    pngs = []
    for name, m in results.items():
        png = stem.parent / f"{stem.name}.{name}.heatmap.png"
        png.write_bytes(heatmap_png(m["accuracy_matrix"], f"{name} class-IL accuracy ({args.dataset}, {model})"))
        pngs.append(png.name)
    curves = stem.parent / f"{stem.name}.curves.png"
    curves.write_bytes(curves_png(results, f"class-IL accuracy ({args.dataset}, {model})"))
    pngs.append(curves.name)
    text = (f"# accuracy: {args.dataset}, {model}\n\nCommand: `{meta['command']}`\n\nSettings: {settings}\n\n"
            + markdown_table(rows, COLUMNS) + "\nFigures: " + ", ".join(f"`{p}`" for p in pngs) + "\n\nNotes:\n\n"
            + "".join(f"- {x}\n" for x in meta["notes"]))
    path.with_suffix(".md").write_text(f"Machine: {machine()}\n\n" + text)
    print(text)
    return {"json": str(path), "rows": rows, "pngs": pngs}


if __name__ == "__main__":
    main()
