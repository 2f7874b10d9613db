"""Shared fixtures. Every test runs offline on the CPU with a private feature cache."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("CGIL_CACHE", tempfile.mkdtemp(prefix="cgil-test-cache-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Prelude for subprocess scripts that must run where `import torch` fails (the torch-free paths).
BLOCK_TORCH = """
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
"""


def tiny_config(**overrides):
    """The digits benchmark with small budgets: seconds, yet learning visibly."""
    from cgil.config import TrainConfig

    cfg = TrainConfig.for_dataset("digits", **overrides)
    cfg.generator.passes = overrides.get("passes", 20)
    cfg.align.epochs = overrides.get("epochs", 8)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished CGIL run on digits (5 tasks of 2 classes), shared by the tests that consume runs."""
    from cgil.progress import Reporter
    from cgil.train import run

    out = tmp_path_factory.mktemp("runs") / "cgil"
    run(tiny_config(method="cgil"), out, reporter=Reporter(enabled=False))
    return out
