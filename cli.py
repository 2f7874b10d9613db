"""The `cgil` command line: the composition root. Each command is a thin shell over one library entry point.

Commands owned by a package live in its `commands.py` and import the shared console and error exit
from runtime.console, never this module; cli.py only creates the app and registers them. Nothing in
cgil/, export/ or runtime/ imports it.
"""
from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cgil.choices import DEFAULT_SEED, GENERATOR_KINDS, METHODS, MOG_ESTEPS, VAE_OBJECTIVES  # torch-free: checked before torch loads
from runtime.console import console, guarded
from runtime.errors import CgilError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every sub-command
                  help="Continual learning for a frozen CLIP (CGIL): train, export, serve, update.")


TRAIN_METHODS = (*METHODS, "all")
TRAIN_DEVICES = ("auto", "cpu", "cuda")
# What --resume and --config take from a saved config.json, by flag: the flags a user may leave out.
SAVED_FLAGS = {"dataset": "dataset", "data_dir": "data_dir", "preset": "preset", "model": "model",
               "pretrained": "pretrained", "method": "method", "tasks": "tasks", "seed": "seed", "device": "device",
               "val_split": "val_split", "generator": "generator.kind", "epochs": "align.epochs",
               "lr": "align.lr", "passes": "generator.passes", "vae_objective": "generator.vae_objective",
               "mog_estep": "generator.mog_estep"}


def _close(word: str, choices, what: str) -> None:
    """A usage error before anything heavy is imported: the choices and the nearest one."""
    import difflib

    if word in choices:
        return
    near = difflib.get_close_matches(word, list(choices), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise CgilError(f"unknown {what} {word!r}{hint}; choose one of: {', '.join(choices)}")


def _saved_settings(config: Optional[Path], out: Optional[Path], resume: bool) -> tuple[dict, list[str]]:
    """Settings of a saved run (--resume) or config file (--config), and the methods it covers."""
    from runtime.artifacts import read_json

    if config is not None:
        data = read_json(config)
        return data.get("settings", data), []
    if not resume:
        return {}, []
    if (out / "config.json").is_file():
        return read_json(out / "config.json")["settings"], []
    inside = sorted(p.parent.name for p in out.glob("*/config.json"))
    if inside:  # a --method all directory: one run per method
        settings = read_json(out / inside[0] / "config.json")["settings"]
        return settings, inside
    raise CgilError(f"nothing to resume in {out}: no config.json (start it without --resume)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it unwinds exactly as Ctrl-C does (exit 143, not 130)."""


def _sigterm_as_interrupt():
    """SIGTERM (a `kill`, a job scheduler, a container stop) ends training like Ctrl-C: with the resume hint.
    Returns the function that puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return lambda: None

    def interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _lookup(settings: dict, dotted: str):
    for part in dotted.split("."):
        settings = settings.get(part, {}) if isinstance(settings, dict) else {}
    return None if settings == {} else settings


def _assign(cfg, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part)
    setattr(target, last, value)


@app.command()
@guarded
def train(
    ctx: typer.Context,
    dataset: str = typer.Option("digits", help="digits | folder:PATH | a registered dataset name (cgil data list)"),
    data_dir: Optional[str] = typer.Option(None, help="Root folder of a registered dataset"),
    preset: Optional[str] = typer.Option(None, help="paper: the CGIL paper's hyperparameters for --dataset (imagenet-r, cub200, cars196, eurosat-rgb, isic)"),
    model: str = typer.Option("cgil-tiny", help="open_clip architecture"),
    pretrained: Optional[str] = typer.Option(None, help="open_clip tag (e.g. openai; downloaded, so online) or a local checkpoint file; default random weights"),
    method: str = typer.Option("cgil", help="cgil | zeroshot | joint | sequential | all"),
    generator: str = typer.Option("vae", help="vae | mog | gauss | diffusion"),
    tasks: Optional[int] = typer.Option(None, help="Number of tasks (default: the dataset's reference split, else 5 or fewer)"),
    seed: int = typer.Option(DEFAULT_SEED, help="Class order and learner seed"),
    epochs: Optional[int] = typer.Option(None, help="Alignment epochs. Default: 20 for digits and folder:PATH; the paper's 60-150 for its datasets; 60 otherwise"),
    lr: Optional[float] = typer.Option(None, help="Alignment learning rate. Default: 0.03; the paper's per dataset"),
    vae_objective: Optional[str] = typer.Option(None, help="VAE reparameterisation and KL: reference (default: the reference code's, z = mu + exp(s) eps) | textbook (std = exp(logvar / 2))"),
    mog_estep: Optional[str] = typer.Option(None, help="MoG responsibilities: exact (default: Gaussian densities) | reference (the reference code's weighting)"),
    passes: Optional[int] = typer.Option(None, help="Generator passes over each class's features. Default: 50 for folder:PATH, 100 for digits, 500 (750 isic) for the paper's datasets and otherwise"),
    val_split: Optional[float] = typer.Option(None, help="folder:PATH without test/: hold out this share of each class of train/ (seeded, stratified)"),
    strict: bool = typer.Option(False, help="Abort on an unreadable image instead of skipping it with a warning"),
    device: str = typer.Option("auto", help="auto (cuda if present, else cpu) | cpu | cuda"),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<timestamp>)"),
    resume: bool = typer.Option(False, help="Continue the interrupted run in --out with its saved settings"),
    config: Optional[Path] = typer.Option(None, help="Replay the settings of a saved RUN/config.json (flags given still win)"),
    quiet: bool = typer.Option(False, help="No progress bars"),
    plots: bool = typer.Option(True, help="Render the PNG figures (matplotlib, ~0.7 CPU-s a run); the CSV, JSON and "
                               "Markdown reports are written either way"),
):
    """Train a class-incremental benchmark task by task and report the accuracy matrix and metrics.

    Under torchrun, feature extraction is sharded across processes; only rank 0 prints and writes.
    """
    if resume and out is None:
        raise CgilError("--resume needs --out RUN_DIR")
    if resume and config is not None:
        raise CgilError("give --resume (the run's own settings) or --config, not both")
    # Flags typed on the command line; the others may come from a saved run or config file.
    # (compared by name: typer may bring its own copy of click, whose enum is not click's)
    given = {name for name in SAVED_FLAGS
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    saved, saved_methods = _saved_settings(config, out, resume)
    values = dict(ctx.params)
    if saved:  # what was not typed comes from the saved run, so nothing needs retyping
        for flag, key in SAVED_FLAGS.items():
            if flag not in given:
                values[flag] = _lookup(saved, key)
        values["method"] = values["method"] or ctx.params["method"]
    if saved_methods and "method" not in given:
        values["method"] = "all" if len(saved_methods) > 1 else saved_methods[0]
    _close(values["method"], TRAIN_METHODS, "method")
    _close(str(values["device"]).split(":")[0], TRAIN_DEVICES, "device")
    _close(values["generator"], GENERATOR_KINDS, "generator")
    if values["vae_objective"] is not None:
        _close(values["vae_objective"], VAE_OBJECTIVES, "VAE objective")
    if values["mog_estep"] is not None:
        _close(values["mog_estep"], MOG_ESTEPS, "MoG E-step")
    from cgil.checks import absolute_paths, check_numbers, check_pretrained, refuse_finished_run
    from cgil.data import check_dataset_name  # torch-free: a wrong name fails before torch loads

    check_dataset_name(values["dataset"])
    check_numbers(values)
    if values["dataset"].startswith("folder:"):  # the layout from directory listings, before torch loads
        from cgil.data.folder import folder_layout

        folder_layout(values["dataset"][len("folder:"):], values["val_split"])
    check_pretrained(values["pretrained"])
    absolute_paths(values, given if saved else set(SAVED_FLAGS))
    refuse_finished_run(out, list(TRAIN_METHODS[:-1]) if values["method"] == "all" else [values["method"]], resume)

    from cgil import distributed
    from cgil.config import TrainConfig
    from cgil.progress import Reporter
    from cgil.report import dataset_label, matrix_table, summary_table, write_comparison
    from cgil.train import resolve_device, run

    overrides = {k: values[k] for k in ("epochs", "lr", "passes", "val_split") if values[k] is not None}
    device = resolve_device(values["device"])
    distributed.init_from_env(device)
    main = distributed.is_main()
    out = (out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")).absolute()  # hints work from anywhere
    reporter = Reporter(enabled=not quiet and main)
    methods = list(METHODS) if values["method"] == "all" else [values["method"]]
    if main:
        console.print(f"run directory: {out}")
    results, start = {}, time.perf_counter()
    restore_sigterm = _sigterm_as_interrupt()
    try:
        for m in methods:
            if saved:  # the saved settings whole (n_ctx, batch sizes...), then the flags typed now
                cfg = TrainConfig.from_dict(saved)
                cfg.method, cfg.device = m, device
                for flag in given - {"method", "device"}:
                    _assign(cfg, SAVED_FLAGS[flag], values[flag])
            else:
                cfg = TrainConfig.for_dataset(values["dataset"], preset=values["preset"], data_dir=values["data_dir"],
                                              model=values["model"], pretrained=values["pretrained"], method=m,
                                              generator=values["generator"], tasks=values["tasks"],
                                              seed=values["seed"], device=device, **overrides)
                for flag in ("vae_objective", "mog_estep"):
                    if values[flag] is not None:
                        _assign(cfg, SAVED_FLAGS[flag], values[flag])
            metrics = run(cfg, out / m if len(methods) > 1 else out, resume=resume, reporter=reporter, strict=strict,
                          plots=plots)
            results[m] = metrics
            if len(methods) == 1 and main:
                console.print(matrix_table(metrics["accuracy_matrix"], f"{m}: class-IL accuracy matrix (%)"))
    except KeyboardInterrupt as e:
        if main:
            again = f"cgil train --out {shlex.quote(str(out))} --resume"
            Console(stderr=True, markup=False, highlight=False, soft_wrap=True).print(
                f"interrupted; finished tasks are saved. Continue with: {again}")
        raise typer.Exit(code=143 if isinstance(e, Terminated) else 130) from None
    finally:
        restore_sigterm()
        distributed.shutdown()
    if not main:
        return
    if len(methods) > 1:
        write_comparison(out, results, plots=plots)
    weights = "random weights" if not values["pretrained"] else values["pretrained"]
    console.print(summary_table(results, f"{dataset_label(values['dataset'])} · {values['model']} · {weights}"))
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


# Shown under each command's --help: a first working command line to copy.
EXAMPLES = {
    "train": ["cgil train", "cgil train --dataset folder:~/photos --val-split 0.2 --method all",
              "cgil train --out runs/mine --resume", "cgil train --config runs/mine/config.json --seed 1996"],
    "eval": ["cgil eval runs/demo/cgil", "cgil eval runs/demo/cgil --dataset folder:~/more-photos"],
    "info": ["cgil info runs/demo", "cgil info runs/demo/cgil"],
    "export": ["cgil export runs/demo/cgil --out bundle/", "cgil export runs/demo/cgil --out bundle-int8/ --precision int8"],
    "predict": ["cgil predict bundle/ photo.jpg", "cgil predict bundle/ photos/ --top-k 3 --json"],
    "serve": ["cgil serve bundle/", "cgil serve bundle/ --host 0.0.0.0 --port 8080 --admin-token SECRET"],
    "update": ["cgil update bundle/ --data new-classes/", "cgil update bundle/ --zero-shot forklift",
               "cgil update --rollback bundle/"],
    "store info": ["cgil store info bundle/", "cgil store info bundle/ --json"],
    "data list": ["cgil data list"],
    "data check": ["cgil data check folder:~/photos", "cgil data check cub200 --data-dir ~/data --all"],
    "data download": ["cgil data download eurosat-rgb --data-dir ~/data"],
}


def _epilog(lines: list[str]) -> str:
    return "Examples:\n\n" + "\n".join(f"  {line}" for line in lines)


def _add_examples(typer_app: typer.Typer, prefix: str = "") -> None:
    for info in typer_app.registered_commands:
        name = prefix + (info.name or info.callback.__name__.replace("_", "-"))
        if name in EXAMPLES and not info.epilog:
            info.epilog = _epilog(EXAMPLES[name])
        elif name.startswith("bench ") or prefix == "bench ":
            info.epilog = _epilog([f"cgil {name} --quick", f"cgil {name} --help  (the script's own options)"])
    for group in typer_app.registered_groups:
        _add_examples(group.typer_instance, prefix + group.name + " ")


def _show_version(value: bool) -> None:
    if value:
        from cgil import __version__  # the one version source (pyproject reads it too)

        typer.echo(f"cgil {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit")) -> None:
    pass


_add_examples(app)


def main() -> None:  # python -m cli
    app()


if __name__ == "__main__":
    sys.exit(main())
