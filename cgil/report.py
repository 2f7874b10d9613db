"""Results on disk (JSON, CSV, PNG heatmap) and on screen (rich tables)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.table import Table

from runtime.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text

SUMMARY_KEYS = [
    ("final_avg_acc", "final avg"),
    ("final_pooled_acc", "final pooled"),
    ("avg_incremental_acc", "avg incr."),
    ("forgetting", "forgetting"),
    ("transfer", "transfer"),
    ("transfer_unnormalised", "transfer (ref.)"),
]


def matrix_csv(matrix: Sequence[Sequence[Optional[float]]]) -> str:
    header = "after_task," + ",".join(f"task_{k + 1}" for k in range(len(matrix[0])))
    lines = [header] + [f"{t + 1}," + ",".join("" if v is None else f"{v:.4f}" for v in row) for t, row in enumerate(matrix)]
    return "\n".join(lines) + "\n"


def heatmap_png(matrix: Sequence[Sequence[Optional[float]]], title: str,
                task_labels: Optional[Sequence[str]] = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = data.shape[0]
    labels = list(task_labels) if task_labels else [str(k + 1) for k in range(n)]
    # named tasks need room for their labels: rotated under the x axis, left of the y axis
    size = (3.2 + 0.6 * n, 2.4 + 0.55 * n) if task_labels else (1.0 + 0.6 * n, 0.8 + 0.55 * n)
    fig, ax = plt.subplots(figsize=size, dpi=120)
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xticks(range(n), labels, rotation=90 if task_labels else 0, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    return _finish_png(fig, ax, im, title, fig.get_figwidth(), "accuracy (%)")


def task_labels(tasks: Sequence[Sequence[int]], classnames: Sequence[str], shown: int = 3) -> list[str]:
    """`T1: coins, keys` per task: which classes each row and column of the matrix is about."""
    out = []
    for k, classes in enumerate(tasks):
        names = [classnames[c] for c in classes[:shown]]
        more = f" +{len(classes) - shown}" if len(classes) > shown else ""
        out.append(f"T{k + 1}: " + ", ".join(n if len(n) <= 18 else n[:17] + "…" for n in names) + more)
    return out


def dataset_label(dataset: str) -> str:
    """`folder:photos` for `folder:/home/someone/photos`: a title names the dataset, not where it lives."""
    if dataset.startswith("folder:"):
        return "folder:" + (Path(dataset[len("folder:"):]).name or dataset[len("folder:"):])
    return dataset


def _finish_png(fig, ax, im, title: str, width_in: float, colorbar_label: str) -> bytes:
    """Title (wrapped to the figure), colour bar, layout, then the figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    ax.set_title(wrap_title(title, width_in, 9), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=colorbar_label)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def wrap_title(title: str, width_in: float, fontsize: float) -> str:
    """Break a title into lines that fit the figure: a long folder: path was cut off at the edges."""
    import textwrap

    chars = max(16, int(width_in * 72 / (0.55 * fontsize)))  # average glyph ~0.55 em wide
    return "\n".join(textwrap.wrap(title, chars, break_long_words=True, break_on_hyphens=False)) or title


def per_class_rows(classnames: Sequence[str], labels: Sequence[int], pred: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for c, name in enumerate(classnames):
        hits = [p == c for l, p in zip(labels, pred) if l == c]
        rows.append({"class": c, "name": name, "test_images": len(hits),
                     "accuracy": 100.0 * sum(hits) / len(hits) if hits else None})
    return rows


def confusion_png(matrix: Any, classnames: Sequence[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(classnames)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) * 100
    side = min(16.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=110)
    im = ax.imshow(rows, vmin=0, vmax=100, cmap="Blues")
    if n <= 30:
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 60 else "black")
    ticks = range(n) if n <= 60 else range(0, n, max(1, n // 30))
    ax.set_xticks(list(ticks), [classnames[k] for k in ticks], rotation=90, fontsize=7)
    ax.set_yticks(list(ticks), [classnames[k] for k in ticks], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return _finish_png(fig, ax, im, title, side, "% of the true class")


def write_class_report(out: Path, classnames: Sequence[str], labels: Sequence[int], pred: Sequence[int],
                       plots: bool = True) -> None:
    """After the last task: per-class accuracy (CSV) and the confusion matrix (CSV + PNG) over all classes."""
    import csv
    import numpy as np

    rows = per_class_rows(classnames, labels, pred)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "name", "test_images", "accuracy"])
    for r in rows:
        writer.writerow([r["class"], r["name"], r["test_images"], "" if r["accuracy"] is None else f"{r['accuracy']:.2f}"])
    atomic_write_text(out / "per_class_accuracy.csv", buf.getvalue())
    n = len(classnames)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true \\ predicted", *classnames])
    for name, row in zip(classnames, matrix):
        writer.writerow([name, *row.tolist()])
    atomic_write_text(out / "confusion_matrix.csv", buf.getvalue())
    if plots:
        atomic_write_bytes(out / "confusion_matrix.png", confusion_png(matrix, classnames, "confusion after the last task"))


def write_run_report(out: Path, metrics: dict[str, Any], plots: bool = True) -> None:
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "accuracy_matrix.csv", matrix_csv(metrics["accuracy_matrix"]))
    if not plots:
        return
    labels = task_labels(metrics["tasks"], metrics["class_names"]) if metrics.get("tasks") else None
    atomic_write_bytes(out / "accuracy_matrix.png", heatmap_png(metrics["accuracy_matrix"], matrix_title(metrics), labels))


def matrix_title(metrics: dict[str, Any]) -> str:
    return f"{metrics['method']} class-IL accuracy ({dataset_label(metrics['dataset'])}, {metrics['model']})"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def summary_table(results: dict[str, dict[str, Any]], title: str = "Results (percent)") -> Table:
    table = Table(title=title, caption="accuracies in %; transfer (ref.): the reference's unnormalised zero-shot keys")
    table.add_column("method", no_wrap=True)
    for _, label in SUMMARY_KEYS:
        table.add_column(label, justify="right")
    for name, m in results.items():
        table.add_row(name, *[_fmt(m.get(k)) for k, _ in SUMMARY_KEYS])
    return table


def matrix_table(matrix: Sequence[Sequence[Optional[float]]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("after task")
    for k in range(len(matrix[0])):
        table.add_column(f"T{k + 1}", justify="right")
    for t, row in enumerate(matrix):
        table.add_row(str(t + 1), *["" if v is None else f"{v:.1f}" for v in row])
    return table


def write_comparison(out: Path, results: dict[str, dict[str, Any]], plots: bool = True) -> dict[str, Any]:
    comparison = {
        name: {k: m.get(k) for k, _ in SUMMARY_KEYS} | {"timings": m.get("timings"), "run": name}
        for name, m in results.items()
    }
    atomic_write_json(out / "comparison.json", comparison)
    lines = ["| method | " + " | ".join(label for _, label in SUMMARY_KEYS) + " |",
             "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k, _ in SUMMARY_KEYS) + " |")
    atomic_write_text(out / "comparison.md", "\n".join(lines) + "\n")
    if plots:
        atomic_write_bytes(out / "comparison.png", comparison_png(results))
    return comparison


def comparison_png(results: dict[str, dict[str, Any]]) -> bytes:
    """`--method all`: each method's class-IL accuracy over the tasks seen so far, after every task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for name, m in results.items():
        curve = [sum(v for v in row if v is not None) / max(1, sum(v is not None for v in row))
                 for row in m["accuracy_matrix"]]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{name} ({_fmt(m.get('final_avg_acc'))})")
    first = next(iter(results.values()))
    ax.set_xticks(range(1, len(first["accuracy_matrix"]) + 1))
    ax.set_ylim(0, 100)
    ax.set_xlabel("after training task")
    ax.set_ylabel("average class-IL accuracy over seen tasks (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    title = f"{dataset_label(str(first.get('dataset', '')))}, {first.get('model', '')}: methods compared"
    ax.set_title(wrap_title(title, 6.0, 9), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
