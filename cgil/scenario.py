"""Class-incremental scenario: a seeded class order cut into tasks of disjoint classes.

Classes are referred to by their dataset index everywhere; `order` only decides which task each
class arrives in. Task t holds `order[offsets[t]:offsets[t+1]]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from runtime.errors import CgilError


def class_order(num_classes: int, seed: Optional[int]) -> list[int]:
    """The reference protocol (None: identity).

    The reference relabels class c as perm[c] with perm = numpy's legacy seeded permutation and
    then takes tasks in label order, so the classes arrive in the order argsort(perm).
    """
    if seed is None:
        return list(range(num_classes))
    return [int(c) for c in np.argsort(np.random.RandomState(seed).permutation(num_classes))]


def task_sizes(num_classes: int, num_tasks: int) -> list[int]:
    """Even split; the remainder goes one class each to the first tasks."""
    if not 1 <= num_tasks <= num_classes:
        raise CgilError(f"--tasks must be between 1 and {num_classes} (the number of classes), got {num_tasks}")
    base, extra = divmod(num_classes, num_tasks)
    return [base + (1 if t < extra else 0) for t in range(num_tasks)]


@dataclass(frozen=True)
class Scenario:
    order: tuple[int, ...]
    offsets: tuple[int, ...]  # len T+1, offsets[0] == 0, offsets[-1] == num_classes

    @classmethod
    def build(cls, num_classes: int, sizes: Sequence[int], seed: Optional[int]) -> "Scenario":
        if sum(sizes) != num_classes or min(sizes) < 1:
            raise CgilError(f"task sizes {list(sizes)} do not partition {num_classes} classes")
        return cls(tuple(class_order(num_classes, seed)), tuple(int(x) for x in np.cumsum([0, *sizes])))

    @property
    def num_tasks(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_classes(self) -> int:
        return self.offsets[-1]

    def task_classes(self, t: int) -> list[int]:
        return list(self.order[self.offsets[t]:self.offsets[t + 1]])

    def seen_classes(self, t: int) -> list[int]:
        """Classes of tasks 0..t, in arrival order (this is the column order of the head)."""
        return list(self.order[: self.offsets[t + 1]])

    def tasks(self) -> list[list[int]]:
        return [self.task_classes(t) for t in range(self.num_tasks)]
