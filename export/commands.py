"""`cgil export` and `cgil update`: registered on the main Typer app by cli.py.

`cgil update --zero-shot/--rollback` runs runtime code only (no torch); `--data` imports the learner.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cgil.choices import DEFAULT_SEED
from runtime.console import console, fail, guarded, require_learner
from runtime.format import KEEP


def register(app: typer.Typer) -> None:
    @app.command("export")
    @guarded
    def export_command(
        run_dir: Path = typer.Argument(..., help="A run directory written by cgil train"),
        out: Path = typer.Option(..., "--out", help="Bundle directory to write"),
        format: str = typer.Option("onnx", "--format", help="onnx | tensorrt | triton"),
        precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 (image engine)"),
        max_batch: int = typer.Option(32, "--max-batch", help="Largest batch (TensorRT profile, Triton max_batch_size)"),
        min_agreement: Optional[float] = typer.Option(
            None, help="Least top-1 agreement with fp32 on the test split (default 0.99 fp16, 0.95 int8)"),
        text: bool = typer.Option(True, "--text/--no-text", help="Include the text graphs (add class names on device)"),
        triton_platform: str = typer.Option("onnxruntime", "--triton-platform",
                                            help="onnxruntime | tensorrt: what --format triton's repository holds"),
        force: bool = typer.Option(False, "--force", help="Replace an existing bundle"),
    ):
        """Export a run's image/text paths and head to a verified deployment bundle."""
        from .bundle import export_bundle

        manifest = export_bundle(run_dir, out, format=format, precision=precision, max_batch=max_batch, force=force,
                                 min_agreement=min_agreement, text=text, triton_platform=triton_platform,
                                 report=lambda line: console.print(line, highlight=False))
        for name, check in manifest["checks"].items():
            console.print(f"check {name}: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in check.items()), highlight=False)

    @app.command("update")
    @guarded
    def update_command(
        bundle: Path = typer.Argument(..., help="A bundle written by cgil export"),
        data: Optional[Path] = typer.Option(None, "--data", help="One folder of images per new class (DIR/<class>/*)"),
        zero_shot: List[str] = typer.Option([], "--zero-shot", help="Add a class by name alone (repeatable; no torch)"),
        rollback: bool = typer.Option(False, "--rollback", help="Point the bundle back at its previous head version"),
        epochs: Optional[int] = typer.Option(None, help="Alignment epochs (default: the head's recorded setting, else 60)"),
        lr: Optional[float] = typer.Option(None, help="Alignment learning rate (default: recorded, else 0.03)"),
        passes: Optional[int] = typer.Option(None, help="Generator passes over each new class's features (default: the store's)"),
        seed: int = typer.Option(DEFAULT_SEED, help="Seed of the new prompts, generators and alignment"),
        store_precision: str = typer.Option("fp32", "--store-precision", help="fp32 | fp16: how the replay store is written"),
        device: str = typer.Option("auto", "--device", help="auto (cuda if present, else cpu, as cgil train) | cpu | cuda | cuda:N: where --data fits generators and realigns"),
        strict: bool = typer.Option(False, help="--data: abort on an unreadable image instead of skipping it with a warning (as cgil train)"),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
        keep: int = typer.Option(KEEP, "--keep", min=2, help="Head versions kept on disk after this update, the new one included: N - 1 rollbacks stay possible"),
    ):
        """Learn new classes on the device and publish them as a new head version (atomic).

        --data DIR: embeds the images with the bundle's own image engine, fits generators for the new
        classes and realigns ALL prompts on replay from the bundle's generator store. This step NEEDS
        TORCH (and open_clip) to run the text tower; serving does not.

        --zero-shot NAME: adds a class by name only, with its zero-shot key from the bundle's text ONNX
        graph (no torch); a later --data update of that name replaces it with a learned prompt.

        --rollback: returns to the previous version.

        A running `cgil serve` swaps to the new head by itself. Class names must be new (except a
        zero-shot class learned from images).
        """
        from runtime.heads import add_zero_shot, rollback as do_rollback

        chosen = sum([bool(data), bool(zero_shot), rollback])
        if chosen != 1:
            fail("give exactly one of --data DIR, --zero-shot NAME or --rollback")
        if rollback:
            old, new = do_rollback(bundle)
            result = {"rolled_back_from": old, "current": new}
        elif zero_shot:
            result = add_zero_shot(bundle, zero_shot, keep=keep)
        else:
            require_learner("cgil update --data")  # before any image is embedded
            from .update import update_from_images

            result = update_from_images(bundle, data, epochs=epochs, lr=lr, passes=passes, seed=seed,
                                        store_precision=store_precision, device=device, keep=keep, strict=strict,
                                        report=lambda s: typer.echo(s, err=as_json) if as_json else console.print(s, highlight=False))
        if as_json:
            typer.echo(json.dumps(result))
        elif rollback:
            console.print(f"rolled back: {result['rolled_back_from']} -> {result['current']}")
        elif "timings" in result:  # --data: its report already said "published ..."
            console.print("phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items()))
        else:
            console.print(f"published head v{result['version']} ({result['directory']}): added {', '.join(result['added'])}")
