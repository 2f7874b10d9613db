"""`cgil predict`: registered on the main Typer app by cli.py. Never imports torch for onnxruntime/tensorrt."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from .console import console, fail, guarded
from .errors import CgilError
from .images import IMAGE_EXTENSIONS


def expand(paths: list[Path]) -> list[Path]:
    """Files as given (always tried: a non-image is a per-file error), folders -> their image files, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            out.append(p)
    return out


def _short_names(args: list[Path], files: list[Path]) -> list[str]:
    """Table labels: a file found in a folder argument as folder/relative path, others as typed."""
    names = []
    for f in files:
        folder = next((a for a in args if a.is_dir() and a in f.parents), None)
        names.append(str(Path(folder.name) / f.relative_to(folder)) if folder else str(f))
    return names


def predict_files(classifier, files: list[Path], top_k: int, batch: int = 32) -> list[dict]:
    """One result per file, in order: {"file", "labels", "scores", ...} or {"file", "error"}."""
    results: list[dict] = []
    for start in range(0, len(files), batch):
        chunk, pixels, slots = files[start:start + batch], [], []
        for f in chunk:
            try:
                pixels.append(classifier.preprocess.pixels(f))
                slots.append({"file": str(f)})
            except CgilError as e:
                slots.append({"file": str(f), "error": str(e)})
        if pixels:
            import numpy as np

            preds = iter(classifier.classify(classifier.embed_pixels(np.stack(pixels)), top_k))
            for slot in slots:
                if "error" not in slot:
                    slot.update(next(preds).to_dict())
        results += slots
    return results


def register(app: typer.Typer) -> None:
    @app.command("predict")
    @guarded
    def predict_command(
        bundle: Path = typer.Argument(..., help="A bundle written by cgil export"),
        images: List[Path] = typer.Argument(..., help="Image files and/or folders of images"),
        top_k: int = typer.Option(5, "--top-k", min=1, help="Labels per image"),
        as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
        backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt | torch (a cross-check; needs the learner installed)"),
    ):
        """Classify images with an exported bundle. Exit code 1 if any file could not be read."""
        from rich.table import Table
        from rich.text import Text

        from .classifier import Classifier
        from .names import printable

        classifier = Classifier(bundle, backend=backend)
        files = expand(images)
        if not files:
            fail("no image files found in: " + ", ".join(map(str, images)))
        results = predict_files(classifier, files, top_k)
        if as_json:
            for r in results:
                typer.echo(json.dumps(r))
        else:
            table = Table(title=f"{bundle} · head v{classifier.head.version} · {classifier.backend.name}")
            table.add_column("file", overflow="fold")
            for col in ("top-1", "score"):
                table.add_column(col)
            table.add_column(f"top-{top_k}", overflow="fold")
            shown = _short_names(images, files)
            for r, name in zip(results, shown):
                # names and messages come from files: never raw control or bidi characters (and the
                # console reads no markup, so brackets print as written)
                name = printable(name)
                if "error" in r:
                    table.add_row(name, Text("error", "red"), "", printable(r["error"]))
                else:
                    labels = [printable(label) for label in r["labels"]]
                    rest = ", ".join(f"{l} {s:.2f}" for l, s in zip(labels, r["scores"]))
                    table.add_row(name, labels[0], f"{r['scores'][0]:.3f}", rest)
            console.print(table)
        failed = [r for r in results if "error" in r]
        if failed:
            for r in failed:
                typer.echo(f"error: {printable(r['error'])}", err=True)
            raise typer.Exit(code=1)
