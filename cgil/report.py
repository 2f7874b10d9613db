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


def heatmap_png(matrix: Sequence[Sequence[Optional[float]]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = data.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n), dpi=120)
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xticks(range(n), [str(k + 1) for k in range(n)])
    ax.set_yticks(range(n), [str(t + 1) for t in range(n)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_run_report(out: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "accuracy_matrix.csv", matrix_csv(metrics["accuracy_matrix"]))
    title = f"{metrics['method']} class-IL accuracy ({metrics['dataset']}, {metrics['model']})"
    atomic_write_bytes(out / "accuracy_matrix.png", heatmap_png(metrics["accuracy_matrix"], title))


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


def write_comparison(out: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
    return comparison
