"""Shared fixtures. Every test runs offline on the CPU with a private feature cache.

Every fixture used by more than one test module lives here and nowhere else: pytest sees conftest
fixtures in every module of tests/, so no module imports a fixture from another. An imported fixture
is registered again in the importing module, and a session fixture registered in six modules is built
six times (a train + export each); tests/test_suite.py fails on such an import.
"""
from __future__ import annotations

import os
import shutil
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


def tiny_learner(names, epochs: int = 2):
    """A cgil-tiny learner (seeded g) with `names` as classes 0..n-1: the alignment tests' subject."""
    import torch

    from cgil.clip import create_clip
    from cgil.generators import GeneratorConfig
    from cgil.learner import AlignConfig, Learner

    torch.manual_seed(0)  # g's initial weights
    learner = Learner(create_clip("cgil-tiny", seed=0), GeneratorConfig(), AlignConfig(epochs=epochs, batch_size=16))
    learner.add_classes(list(range(len(names))), list(names), seed=1)
    return learner


# ---- a trained run and its exported bundles (test_export, test_runtime, test_predict_cli, ...) ------
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished CGIL run on digits (5 tasks of 2 classes), shared by the tests that consume runs."""
    from cgil.progress import Reporter
    from cgil.train import run

    out = tmp_path_factory.mktemp("runs") / "cgil"
    run(tiny_config(method="cgil"), out, reporter=Reporter(enabled=False))
    return out


@pytest.fixture(scope="session")
def fp32_bundle(tiny_run, tmp_path_factory) -> Path:
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(tiny_run, out, precision="fp32", max_batch=8)
    return out


@pytest.fixture(scope="session")
def int8_bundle(tiny_run, tmp_path_factory) -> Path:
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    export_bundle(tiny_run, out, precision="int8", text=False)
    return out


@pytest.fixture(scope="session")
def tiny_clip():
    from cgil.clip import create_clip

    return create_clip("cgil-tiny", None, "cpu", 0)


# ---- the device's bundle before an update (test_update, test_serve, test_hostile, ...) --------------
@pytest.fixture(scope="session")
def update_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("update-work")


@pytest.fixture(scope="session")
def base_bundle(update_work) -> Path:
    """digits 0-7 learned by CGIL (4 tasks of 2), exported: the device's bundle before any update."""
    from benchmarks.serve import build_base_bundle

    return build_base_bundle(update_work, generator="gauss", passes=2, epochs=2, max_batch=32)


@pytest.fixture(scope="session")
def new_digits(update_work) -> Path:
    """DIR/eight/*.png, DIR/nine/*.png: 40 training images of each new class."""
    from benchmarks.serve import write_digit_folders

    return write_digit_folders(update_work / "new", (8, 9), splits=("train",), flat=True, limit=40)


@pytest.fixture
def bundle(base_bundle, tmp_path) -> Path:
    """A private copy of base_bundle that a test may update, roll back or break."""
    out = tmp_path / "bundle"
    shutil.copytree(base_bundle, out)
    return out


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory):
    """The tiny model's image graph at every precision, as `cgil export` writes them."""
    from cgil.clip import create_clip, preprocess_config
    from export.onnx_export import export_image
    from export.quantize import to_fp16, to_int8

    from benchmarks.latency import digits_pixels

    clip = create_clip("cgil-tiny", None, "cpu", 0)
    cfg = preprocess_config(clip)
    d = tmp_path_factory.mktemp("graphs")
    fp32 = export_image(clip, cfg, d / "fp32.onnx")
    calibration, _ = digits_pixels(cfg, "train", 64)
    batches = [calibration[i:i + 16] for i in range(0, len(calibration), 16)]
    return {"clip": clip, "preprocess": cfg, "fp32": fp32, "fp16": to_fp16(fp32, d / "fp16.onnx"),
            "int8-tensorrt": to_int8(fp32, d / "int8-trt.onnx", batches, target="tensorrt"),
            "int8-cpu": to_int8(fp32, d / "int8-cpu.onnx", batches, target="cpu")}


# ---- test tiers (pyproject markers; `make test-fast` runs -m "not slow and not gpu") ---------------
# A test that asks for one of these fixtures waits for a training run and an export (or a copy of one):
# it is slow by what it needs, so it is marked here rather than by hand in each module.
SLOW_FIXTURES = frozenset({"tiny_run", "fp32_bundle", "int8_bundle", "base_bundle", "bundle",
                           "folder_run", "tiny_graphs", "device_venv", "relative_run"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
