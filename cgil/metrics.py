"""Continual-learning metrics from saved accuracy matrices (percentages, 0-100).

A[t][k] is the accuracy on task k's test set after training task t; entries with k > t are not
part of the class-IL matrix (they are None). Transfer matrices hold entries with k > t only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

Matrix = Sequence[Sequence[Optional[float]]]


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def final_avg_acc(acc: Matrix) -> float:
    """Mean over tasks of the last row (the reference convention)."""
    return _mean(acc[-1])


def final_pooled_acc(acc: Matrix, test_sizes: Sequence[int]) -> float:
    """Accuracy over all test samples pooled (the other common convention)."""
    last = np.asarray(acc[-1], dtype=float)
    sizes = np.asarray(test_sizes, dtype=float)
    return float((last * sizes).sum() / sizes.sum())


def step_accuracies(acc: Matrix) -> list[float]:
    return [_mean(row[: t + 1]) for t, row in enumerate(acc)]


def avg_incremental_acc(acc: Matrix) -> float:
    return float(np.mean(step_accuracies(acc)))


def forgetting(acc: Matrix) -> Optional[float]:
    """Mean over k < T-1 of (best accuracy on k before the last task) - (accuracy on k at the end)."""
    num_tasks = len(acc)
    if num_tasks < 2:
        return None
    drops = [max(acc[t][k] for t in range(k, num_tasks - 1)) - acc[-1][k] for k in range(num_tasks - 1)]
    return float(np.mean(drops))


def transfer(transfer_matrix: Matrix) -> Optional[float]:
    """Mean over t < T-1 of the mean accuracy on future tasks k > t (None with a single task)."""
    num_tasks = len(transfer_matrix)
    rows = [_mean(transfer_matrix[t][t + 1:]) for t in range(num_tasks - 1)]
    return _mean(rows)


def summarize(acc: Matrix, test_sizes: Sequence[int], transfer_matrix: Matrix,
              transfer_unnormalised_matrix: Optional[Matrix] = None) -> dict:
    out = {
        "final_avg_acc": final_avg_acc(acc),
        "final_pooled_acc": final_pooled_acc(acc, test_sizes),
        "avg_incremental_acc": avg_incremental_acc(acc),
        "forgetting": forgetting(acc),
        "transfer": transfer(transfer_matrix),
    }
    if transfer_unnormalised_matrix is not None:
        out["transfer_unnormalised"] = transfer(transfer_unnormalised_matrix)
    return out
