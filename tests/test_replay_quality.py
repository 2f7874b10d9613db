"""Replay quality: Frechet distance and variance ratio per fitted class, recorded in metrics.json and
shown by `cgil info`; a collapsed generator is flagged."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cgil.generators.gauss import GaussGenerators
from cgil.metrics import COLLAPSE_RATIO, frechet_distance, replay_quality, variance_ratio
from cgil.progress import Reporter
from cgil.train import run
from cli import app
from conftest import tiny_config


def correlated(n=500, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def test_frechet_distance_exact_cases():
    a = correlated()
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = np.arange(6.0)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # a scaled copy: C_b = c^2 C_a, so (C_a C_b)^1/2 = c C_a and FD = (1 - c)^2 tr C_a (non-diagonal C_a)
    c, mean = 0.4, a.mean(0)
    b = mean + c * (a - mean)
    tr = np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(b, a) == pytest.approx((1 - c) ** 2 * tr, rel=1e-6)
    assert variance_ratio(b, a) == pytest.approx(c * c, rel=1e-9)


def test_a_collapsed_replay_is_flagged_and_a_faithful_one_is_not():
    real = correlated()
    mean = real.mean(0)
    collapsed = mean + 0.05 * (correlated(seed=1) - correlated(seed=1).mean(0))
    assert replay_quality(collapsed, real)["collapsed"]
    assert replay_quality(collapsed, real)["variance_ratio"] < COLLAPSE_RATIO
    faithful = replay_quality(correlated(seed=0)[::-1].copy(), real)
    assert not faithful["collapsed"] and faithful["variance_ratio"] == pytest.approx(1.0)


@pytest.mark.slow
def test_run_records_replay_quality_and_info_flags_a_collapsed_generator(tmp_path, monkeypatch):
    """Gauss generators whose class 0 is collapsed to its mean (std 0): the run's metrics.json and
    `cgil info` flag exactly that class; the healthy classes' replay keeps about all the variance."""
    fit = GaussGenerators.fit

    def collapsing_fit(self, feats, seed, progress=None):
        out = fit(self, feats, seed, progress)
        for k, c in enumerate(self.class_ids):
            if c == 0:
                self.std[k] = 0.0
        return out

    monkeypatch.setattr(GaussGenerators, "fit", collapsing_fit)
    out = tmp_path / "run"
    metrics = run(tiny_config(method="cgil", generator="gauss", epochs=1), out, reporter=Reporter(enabled=False))
    quality = metrics["replay_quality"]
    assert sorted(quality, key=int) == [str(c) for c in range(10)]
    assert [c for c, q in quality.items() if q["collapsed"]] == ["0"]
    assert quality["0"]["variance_ratio"] == 0.0
    for c, q in quality.items():
        if c != "0":
            assert 0.8 < q["variance_ratio"] < 1.25 and q["frechet"] > 0  # (a diagonal Gaussian misses the
            # features' correlations: its FD can exceed a point mass's, which is why the ratio flags collapse)
    assert json.loads((out / "metrics.json").read_text())["replay_quality"] == quality
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)["replay_quality"]
    assert summary["collapsed_classes"] == ["0"] and summary["min_variance_ratio"] == 0.0
    assert summary["per_class"] == quality


@pytest.mark.slow
def test_replay_quality_does_not_change_results(tmp_path, monkeypatch):
    """Measuring replay draws from its own RNG: a run's accuracies are the same with it switched off."""
    from cgil.learner import Learner

    cfg = dict(method="cgil", generator="gauss", epochs=1, tasks=2)
    with_q = run(tiny_config(**cfg), tmp_path / "a", reporter=Reporter(enabled=False))
    monkeypatch.setattr(Learner, "replay_quality", lambda self, *a, **k: {})
    without = run(tiny_config(**cfg), tmp_path / "b", reporter=Reporter(enabled=False))
    assert with_q["accuracy_matrix"] == without["accuracy_matrix"]
    assert "replay_quality" in with_q and "replay_quality" not in without
