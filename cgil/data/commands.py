"""`cgil data check NAME --data-dir DIR` and `cgil data download NAME --data-dir DIR`.

`check` loads a benchmark through its real loader and compares the images per split and class with
what a complete copy under the reference protocol holds. `download` fetches the public archives
(where the dataset has a stable public link) and extracts them; nothing in the tests calls it.
"""
from __future__ import annotations

import shutil
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from runtime.console import console, fail, guarded, warn
from runtime.errors import CgilError
from .catalog import BENCHMARKS, Benchmark, Expected, default_root


def _bench(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise CgilError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def _expected_for(exp: Expected, classname: str) -> Optional[int]:
    if isinstance(exp, dict):
        return exp.get(classname, exp.get("*"))
    return None


def _expected_total(exp: Expected, classnames: list[str]) -> Optional[int]:
    if isinstance(exp, int):
        return exp
    if isinstance(exp, dict):
        per = [_expected_for(exp, c) for c in classnames]
        return None if any(v is None for v in per) else int(sum(per))
    return None


def folder_report(spec: str, val_split: Optional[float] = None) -> dict[str, Any]:
    """`data check folder:PATH`: what train would use, per split and class, and every file it would skip."""
    from .folder import load_folder_dataset

    ds = load_folder_dataset(spec[len("folder:"):], val_split=val_split, warn=lambda message: None)
    counts = ds.class_counts()
    report: dict[str, Any] = {"name": spec, "title": "your folder", "dataset_id": ds.dataset_id,
                              "root": ds.meta["root"], "num_classes": ds.num_classes, "splits": {},
                              "problems": [f"unreadable, skipped: {p} ({why})" for p, why in ds.meta["skipped"]]}
    for split in ("train", "test"):
        rows = [{"class": c, "count": n, "expected": None, "ok": n > 0} for c, n in counts[split].items()]
        report["splits"][split] = {"total": sum(counts[split].values()), "expected_total": None, "classes": rows}
    report["ok"] = not report["problems"]
    return report


def check_report(name: str, data_dir: Optional[Path], val_split: Optional[float] = None) -> dict[str, Any]:
    """Counts per split and class next to the expected ones. Loader errors (missing files) propagate."""
    from . import _REGISTRY, check_dataset_name

    if name.startswith("folder:"):
        return folder_report(name, val_split)
    check_dataset_name(name)
    bench = _bench(name)
    ds = _REGISTRY[name](Path(data_dir).expanduser() if data_dir else None)
    report: dict[str, Any] = {"name": name, "title": bench.title, "dataset_id": ds.dataset_id,
                              "root": ds.meta.get("root"), "num_classes": ds.num_classes, "splits": {}, "problems": []}
    if ds.num_classes != bench.num_classes:
        report["problems"].append(f"{ds.num_classes} classes, expected {bench.num_classes}")
    if sum(ds.task_sizes or []) != ds.num_classes:
        report["problems"].append(f"task sizes {ds.task_sizes} do not cover {ds.num_classes} classes")
    for split in ("train", "test"):
        part = getattr(ds, split)
        exp = bench.expected.get(split)
        counts = np.bincount(part.labels, minlength=ds.num_classes)
        rows = []
        for c, cname in enumerate(ds.classnames):
            want = _expected_for(exp, cname)
            ok = int(counts[c]) > 0 if want is None else int(counts[c]) == want
            rows.append({"class": cname, "count": int(counts[c]), "expected": want, "ok": ok})
            if not ok:
                report["problems"].append(f"{split}/{cname}: {int(counts[c])} images, expected "
                                          f"{want if want is not None else 'at least 1'}")
        total, want_total = int(len(part)), _expected_total(exp, ds.classnames)
        if want_total is not None and total != want_total:
            report["problems"].append(f"{split}: {total} images in all, expected {want_total}")
        report["splits"][split] = {"total": total, "expected_total": want_total, "classes": rows}
    report["ok"] = not report["problems"]
    return report


def print_report(report: dict[str, Any], show_all: bool) -> None:
    console.print(Text.assemble((report["title"], "bold"), f" ({report['name']}) in {report['root']}"))
    console.print(f"dataset id: {report['dataset_id']}", highlight=False)
    for split, info in report["splits"].items():
        want = info["expected_total"]
        table = Table(title=f"{split}: {info['total']} images" + (f" (expected {want})" if want is not None else ""))
        for col in ("label", "class", "images", "expected", ""):
            table.add_column(col, justify="right" if col in ("label", "images", "expected") else "left")
        for i, row in enumerate(info["classes"]):
            if show_all or not row["ok"]:
                table.add_row(str(i), row["class"], str(row["count"]),
                              "-" if row["expected"] is None else str(row["expected"]),
                              Text("ok", "green") if row["ok"] else Text("differs", "red"))
        if table.row_count:
            console.print(table)
        else:
            console.print(f"{split}: {info['total']} images, all {len(info['classes'])} classes as expected")
    if report["ok"]:
        done = ("every image is readable" if report["name"].startswith("folder:")
                else "every split and class matches the reference protocol")
        console.print(Text.assemble(("complete", "green"), f": {done}"))
    else:
        console.print(Text.assemble((f"{len(report['problems'])} difference(s)", "red"),
                                    " (files train would skip):" if report["name"].startswith("folder:")
                                    else " from a complete copy:"))
        for p in report["problems"][:20]:
            console.print(f"  {p}", highlight=False)


def _fetch(url: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    console.print(f"downloading {url}")
    with urllib.request.urlopen(url) as resp, open(tmp, "wb") as out:  # noqa: S310 (fixed public https URLs)
        total = int(resp.headers.get("Content-Length") or 0)
        done = 0
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            if total:
                print(f"\r  {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", end="", file=sys.stderr)
    print(file=sys.stderr)
    tmp.replace(dest)


def _extract(archive: Path, into: Path) -> None:
    console.print(f"extracting {archive.name}")
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(archive) as t:
            if sys.version_info >= (3, 12):
                t.extractall(into, filter="data")
            else:
                t.extractall(into)  # noqa: S202 (archives from the datasets' own hosts)
    else:
        return


def download(name: str, data_dir: Optional[Path], keep_archives: bool = False) -> Path:
    bench = _bench(name)
    if not bench.downloads:
        raise CgilError(f"{name} has no stable public download link. {bench.how_to_get} Expected layout: {bench.layout}.")
    root = Path(data_dir).expanduser() if data_dir else default_root(name)
    root.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(root).free < 2 * 2**30:
        warn(f"less than 2 GiB free in {root}")
    for d in bench.downloads:
        archive = root / d.filename
        if not archive.exists():
            _fetch(d.url, archive)
        _extract(archive, root / d.extract_to)
        if not keep_archives:
            archive.unlink()
    return root


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(no_args_is_help=True, help="The paper's benchmarks on disk: check a copy, or download one.")

    @data_app.command("check")
    @guarded
    def check_cmd(
        name: str = typer.Argument(..., help=", ".join(sorted(BENCHMARKS)) + ", or folder:PATH"),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder (default $CGIL_DATA/NAME)"),
        show_all: bool = typer.Option(False, "--all", help="List every class, not only those that differ"),
        val_split: Optional[float] = typer.Option(None, help="folder: without test/: the share of train/ held out"),
    ):
        """Count images per split and class and compare with a complete copy under the reference protocol.

        For folder:PATH, the images train would use per split and class, and every unreadable file it
        would skip. Exit code 1 when anything differs or would be skipped.
        """
        report = check_report(name, data_dir, val_split)
        show_all = show_all or name.startswith("folder:")
        print_report(report, show_all)
        if not report["ok"]:
            raise typer.Exit(code=1)

    @data_app.command("download")
    @guarded
    def download_cmd(
        name: str = typer.Argument(..., help=", ".join(sorted(BENCHMARKS))),
        data_dir: Optional[Path] = typer.Option(None, help="Where to put it (default $CGIL_DATA/NAME)"),
        keep_archives: bool = typer.Option(False, help="Keep the downloaded archives after extracting"),
    ):
        """Download and extract a benchmark's public archives (needs internet), then check it."""
        try:
            root = download(name, data_dir, keep_archives)
            report = check_report(name, root)
        except OSError as e:
            fail(f"download of {name} failed: {e}")
        print_report(report, show_all=False)

    @data_app.command("list")
    def list_cmd():
        """The benchmarks, their task splits and where they are looked for by default."""
        table = Table()
        for col in ("name", "dataset", "classes", "tasks", "default folder"):
            table.add_column(col, overflow="fold")  # a narrow terminal wraps a path, never cuts it
        for b in sorted(BENCHMARKS.values(), key=lambda b: b.name):
            sizes = list(b.task_sizes)
            tasks = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else " + ".join(
                f"{sizes.count(s)}x{s}" for s in dict.fromkeys(sizes))
            table.add_row(b.name, b.title, str(b.num_classes), tasks, str(default_root(b.name)))
        console.print(table)

    app.add_typer(data_app, name="data")
