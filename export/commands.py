"""`cgil export`: registered on the main Typer app by cli.py."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from cli import console, guarded

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
        force: bool = typer.Option(False, "--force", help="Replace an existing bundle"),
    ):
        """Export a run's image/text paths and head to a verified deployment bundle."""
        from .bundle import export_bundle

        manifest = export_bundle(run_dir, out, format=format, precision=precision, max_batch=max_batch, force=force,
                                 min_agreement=min_agreement, text=text, report=lambda line: console.print(line, highlight=False))
        for name, check in manifest["checks"].items():
            console.print(f"check {name}: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in check.items()), highlight=False)
