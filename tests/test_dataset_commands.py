"""Benchmark datasets as the learner and the CLI see them: reference task splits, `cgil data check`,
a training run on a benchmark layout, and the paper's presets (fixtures from test_datasets)."""
from __future__ import annotations

import json

import pytest

from runtime.errors import CgilError
from test_datasets import make_isic  # the layouts the loaders read


# ---------------------------------------------------------------- task splits, class order, check command

@pytest.mark.parametrize("name,sizes", [("imagenet-r", [20] * 10), ("cub200", [20] * 10),
                                        ("cars196", [20] * 9 + [16]), ("eurosat-rgb", [2] * 5),
                                        ("isic", [2] * 3), ("cifar100", [10] * 10)])
def test_reference_task_splits(name, sizes):
    from cgil.data.catalog import BENCHMARKS

    b = BENCHMARKS[name]
    assert list(b.task_sizes) == sizes and sum(sizes) == b.num_classes


def test_data_check_reports_counts(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    root = make_isic(tmp_path)
    res = CliRunner().invoke(app, ["data", "check", "isic", "--data-dir", str(root), "--all"])
    assert res.exit_code == 1, res.output  # a 3-image-per-class copy is not the complete release
    assert "melanoma" in res.output and "1113" in res.output and "differs" in res.output
    from cgil.data.commands import check_report

    rep = check_report("isic", root)
    assert rep["splits"]["train"]["total"] == 18 and rep["splits"]["train"]["expected_total"] == 3310
    assert rep["splits"]["test"]["classes"][0] == {"class": "melanoma", "count": 2, "expected": 171, "ok": False}


def test_data_check_missing_dataset_exits_2(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    res = CliRunner().invoke(app, ["data", "check", "cub200", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "images.txt" in res.output


@pytest.mark.slow
def test_train_runs_on_a_benchmark_layout(tmp_path):
    """A paper benchmark goes through the whole pipeline (ISIC layout, 3 tasks of 2)."""
    from cgil.config import TrainConfig
    from cgil.progress import Reporter
    from cgil.train import run

    cfg = TrainConfig.for_dataset("isic", preset="paper", data_dir=str(make_isic(tmp_path / "isic")),
                                  epochs=1, passes=2)
    metrics = run(cfg, tmp_path / "run", reporter=Reporter(enabled=False), cache_dir=tmp_path / "cache")
    assert metrics["tasks"] and len(metrics["tasks"]) == 3
    assert sorted(c for t in metrics["tasks"] for c in t) == list(range(6))
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert settings["preset"] == "paper" and settings["align"]["lr"] == 0.05  # explicit overrides recorded too
    assert settings["align"]["epochs"] == 1 and settings["generator"]["passes"] == 2


@pytest.mark.parametrize("name,lr,epochs,passes", [("imagenet-r", 0.05, 60, 500), ("cars196", 0.03, 60, 500),
                                                   ("cub200", 0.01, 60, 500), ("eurosat-rgb", 0.03, 150, 500),
                                                   ("isic", 0.05, 150, 750)])
def test_paper_preset(name, lr, epochs, passes):
    from cgil.config import TrainConfig

    cfg = TrainConfig.for_dataset(name, preset="paper")
    d = cfg.to_dict()
    assert d["preset"] == "paper" and d["generator"]["kind"] == "vae" and d["n_ctx"] == 1
    assert (d["align"]["lr"], d["align"]["epochs"], d["generator"]["passes"]) == (lr, epochs, passes)
    assert (d["align"]["batch_size"], d["align"]["samples_per_class"], d["align"]["weight_decay"]) == (128, 256, 0.0)
    assert TrainConfig.from_dict(d).to_dict() == d


@pytest.mark.parametrize("name,preset", [("cifar100", "paper"), ("digits", "paper"), ("isic", "fast")])
def test_paper_preset_refuses(name, preset):
    from cgil.config import TrainConfig

    with pytest.raises(CgilError, match="preset"):
        TrainConfig.for_dataset(name, preset=preset)
