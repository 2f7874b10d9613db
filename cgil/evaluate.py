"""Scoring test embeddings against a head, for every row of the accuracy matrices.

Columns are indexed by dataset class. Seen classes use their learned keys; classes not learned
yet use their zero-shot key, L2-normalised (ours) or as the text encoder returns it
(the reference implementation's `transfer_unnormalised`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .text import normalize


@dataclass
class StepScores:
    class_il: list[Optional[float]]  # tasks 0..t, None after
    task_il: list[Optional[float]]
    transfer: list[Optional[float]]  # tasks t+1.., None before
    transfer_unnormalised: list[Optional[float]]


def _acc(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred == target).float().mean() * 100.0) if len(target) else 0.0


@torch.no_grad()
def score_step(keys: torch.Tensor, seen: Sequence[int], zero_shot: torch.Tensor,
               tests: Sequence[tuple[torch.Tensor, torch.Tensor]], tasks: Sequence[Sequence[int]], t: int) -> StepScores:
    """keys: (len(seen), D) normalised; zero_shot: (num_classes, D) unnormalised; tests: per task (feats, labels)."""
    num_classes = zero_shot.shape[0]
    seen_t = torch.as_tensor(list(seen), dtype=torch.long)
    full = normalize(zero_shot.float().cpu()).clone()
    full[seen_t] = keys.float().cpu()
    raw = zero_shot.float().cpu().clone()
    raw[seen_t] = keys.float().cpu()
    seen_mask = torch.zeros(num_classes, dtype=torch.bool)
    seen_mask[seen_t] = True

    scores = StepScores([None] * len(tasks), [None] * len(tasks), [None] * len(tasks), [None] * len(tasks))
    for k, (feats, labels) in enumerate(tests):
        x = normalize(feats.float().cpu())
        if k <= t:
            logits = x @ full.t()
            scores.class_il[k] = _acc(logits.masked_fill(~seen_mask, float("-inf")).argmax(1), labels)
            task_mask = torch.zeros(num_classes, dtype=torch.bool)
            task_mask[torch.as_tensor(list(tasks[k]))] = True
            scores.task_il[k] = _acc(logits.masked_fill(~task_mask, float("-inf")).argmax(1), labels)
        else:
            scores.transfer[k] = _acc((x @ full.t()).argmax(1), labels)
            scores.transfer_unnormalised[k] = _acc((x @ raw.t()).argmax(1), labels)
    return scores
