"""The `cgil` command line: the composition root. Each command is a thin shell over one library entry point.

Commands owned by a package live in its `commands.py` and import the shared console and error exit
from runtime.console, never this module; cli.py only creates the app and registers them. Nothing in
cgil/, export/ or runtime/ imports it.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from runtime.console import console, guarded
from runtime.errors import CgilError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual learning for a frozen CLIP (CGIL): train, export, serve, update.")


@app.command()
@guarded
def train(
    dataset: str = typer.Option("digits", help="digits | folder:PATH | a registered dataset name"),
    data_dir: Optional[str] = typer.Option(None, help="Root folder of a registered dataset"),
    preset: Optional[str] = typer.Option(None, help="paper: the CGIL paper's hyperparameters for --dataset (imagenet-r, cub200, cars196, eurosat-rgb, isic)"),
    model: str = typer.Option("cgil-tiny", help="open_clip architecture"),
    pretrained: Optional[str] = typer.Option(None, help="open_clip tag (e.g. openai) or a local checkpoint file; default random weights"),
    method: str = typer.Option("cgil", help="cgil | zeroshot | joint | sequential | all"),
    generator: str = typer.Option("vae", help="vae | mog | gauss | diffusion"),
    tasks: Optional[int] = typer.Option(None, help="Number of tasks (default: the dataset's reference split)"),
    seed: int = typer.Option(1992, help="Class order and learner seed"),
    epochs: Optional[int] = typer.Option(None, help="Alignment epochs (default: dataset preset)"),
    lr: Optional[float] = typer.Option(None, help="Alignment learning rate (default: dataset preset)"),
    passes: Optional[int] = typer.Option(None, help="Generator passes over each class's features"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<timestamp>)"),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out"),
    quiet: bool = typer.Option(False, help="No progress bars"),
):
    """Train a class-incremental benchmark task by task and report the accuracy matrix and metrics.

    Under torchrun, feature extraction is sharded across processes; only rank 0 prints and writes.
    """
    from cgil import distributed
    from cgil.config import METHODS, TrainConfig
    from cgil.progress import Reporter
    from cgil.report import matrix_table, summary_table, write_comparison
    from cgil.train import run

    overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "passes": passes}.items() if v is not None}
    if method != "all" and method not in METHODS:
        raise CgilError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}, all")
    if resume and out is None:
        raise CgilError("--resume needs --out RUN_DIR")
    distributed.init_from_env(device)
    main = distributed.is_main()
    out = out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    reporter = Reporter(enabled=not quiet and main)
    methods = list(METHODS) if method == "all" else [method]
    if main:
        console.print(f"run directory: {out}")
    results, start = {}, time.perf_counter()
    try:
        for m in methods:
            cfg = TrainConfig.for_dataset(dataset, preset=preset, data_dir=data_dir, model=model, pretrained=pretrained,
                                          method=m, generator=generator, tasks=tasks, seed=seed, device=device,
                                          **overrides)
            metrics = run(cfg, out / m if len(methods) > 1 else out, resume=resume, reporter=reporter)
            results[m] = metrics
            if len(methods) == 1 and main:
                console.print(matrix_table(metrics["accuracy_matrix"], f"{m}: class-IL accuracy matrix (%)"))
    finally:
        distributed.shutdown()
    if not main:
        return
    if len(methods) > 1:
        write_comparison(out, results)
    weights = "random weights" if not pretrained else pretrained
    console.print(summary_table(results, f"{dataset} · {model} · {weights}"))
    console.print(f"done in {time.perf_counter() - start:.1f}s; results in {out}")


@app.command("eval")
@guarded
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by cgil train"),
    dataset: Optional[str] = typer.Option(None, help="Evaluate on another dataset (classes matched by name)"),
    data_dir: Optional[str] = typer.Option(None),
):
    """Re-evaluate a saved run's final head on a test split."""
    from cgil.runs import evaluate_run
    from cgil.report import summary_table

    result = evaluate_run(run_dir, dataset, data_dir)
    console.print(summary_table({result["method"]: result}, f"re-evaluation of {run_dir}"))
    for name, acc in result["per_task"].items():
        console.print(f"  {name}: {acc:.2f}%")


@app.command()
@guarded
def info(run_dir: Path = typer.Argument(..., help="A run directory written by cgil train")):
    """Print what a run holds: classes and the size in bytes of each part."""
    from cgil.runs import run_info

    console.print_json(data=run_info(run_dir))


# Commands owned by other packages: `register(app)` in each module below (a package that is not
# installed, e.g. the learner on a torch-free device, contributes none).
_COMMAND_MODULES = (
    "cgil.data.commands", "export.commands", "runtime.commands", "runtime.serve_commands", "benchmarks.commands",
)


def _torch_backend(bundle, manifest):
    """`--backend torch` for predict/serve: export's PyTorch cross-check, imported only when chosen."""
    from export.torch_backend import torch_backend

    return torch_backend(bundle, manifest)


def _register_commands() -> None:
    import importlib
    import importlib.util

    from runtime.backends import register_backend

    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            importlib.import_module(name).register(app)
    register_backend("torch", _torch_backend)


_register_commands()


def main() -> None:  # python -m cli
    app()


if __name__ == "__main__":
    sys.exit(main())
