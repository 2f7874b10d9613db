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


# ---------------------------------------------------------------- replay quality (per fitted class)

REPLAY_SAMPLES = 1000  # generated samples per class compared with the class's real features
COLLAPSE_RATIO = 0.1  # replay with less than this share of the real features' variance is flagged


def frechet_distance(a, b) -> float:
    """|mean_a - mean_b|^2 + tr(Ca + Cb - 2 (Ca Cb)^1/2) of two (n, D) samples (unbiased covariances).

    tr (Ca Cb)^1/2 = sum of sqrt(eigenvalues of Ca^1/2 Cb Ca^1/2), a symmetric PSD matrix: no sqrtm needed.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cb @ root), 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(ca) + np.trace(cb) - 2 * cross)


def variance_ratio(generated, real) -> float:
    """tr cov(generated) / tr cov(real): the share of the real features' total variance the replay carries."""
    g, r = np.asarray(generated, dtype=np.float64), np.asarray(real, dtype=np.float64)
    return float(g.var(0, ddof=1).sum() / max(r.var(0, ddof=1).sum(), 1e-30))


def replay_quality(generated, real) -> dict:
    """Fidelity of one class's replay: variance ratio, Frechet distance, and a flag for collapse."""
    ratio = variance_ratio(generated, real)
    return {"variance_ratio": ratio, "frechet": frechet_distance(generated, real), "n_real": int(len(real)),
            "n_generated": int(len(generated)), "collapsed": bool(ratio < COLLAPSE_RATIO)}
