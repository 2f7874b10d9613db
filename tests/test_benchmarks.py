"""Benchmarks are not tests: these only check that each script runs end to end on a tiny size and
writes its results (JSON, markdown, PNGs) where it is told to."""
from __future__ import annotations

import json

import pytest


def _load(out_dir, prefix):
    found = sorted(out_dir.glob(f"{prefix}-*.json"))
    assert len(found) == 1, found
    doc = json.loads(found[0].read_text())
    assert doc["machine"]["cpu"] and doc["meta"]["command"].startswith("cgil bench")
    assert found[0].with_suffix(".md").exists()
    return doc


@pytest.mark.slow
def test_update_runs_tiny(tmp_path):
    from benchmarks import update

    update.main(["--quick", "--dims", "64", "--generators", "vae", "gauss", "--out-dir", str(tmp_path)])
    doc = _load(tmp_path, "update")
    fit = {r["generator"]: r for r in doc["meta"]["fit"]}
    assert set(fit) == {"vae", "gauss"}
    for row in fit.values():
        assert row["batched_s"] > 0 and row["one_at_a_time_s"] > 0
        assert row["max_abs_diff_batched_vs_alone"] == 0.0  # a class trained in a batch equals it trained alone
    (align,) = doc["meta"]["align"]
    assert align["step_s_full77"] > 0 and align["max_abs_key_diff"] <= 1e-5
    assert {p["phase"] for p in doc["meta"]["profile_batched_vae_fit"]["phases"]} >= {"optimizer step"}
    vs = doc["meta"]["vae_fit_vs_reference_style"]
    assert vs["cgil_cpu_s"] > 0 and vs["cgil_autograd_loop_cpu_s"] > 0 and vs["reference_style_cpu_s"] > 0
    assert 0 < vs["matmul_floor_hot_ms_per_class_iteration"] and vs["cgil_vs_matmul_floor_in_step_x"] > 0
    assert 0 < vs["gemm_and_adam_ceiling_x"] < vs["gemm_only_ceiling_x"]


def test_the_speed_ceiling_counts_the_vae_parameters_the_fit_updates():
    from benchmarks.update_fit import vae_parameter_count
    from cgil.generators.vae_cpu import FlatVAE

    for d, hidden, latent in [(64, 512, 256), (768, 512, 256), (16, 32, 8)]:
        assert vae_parameter_count(d, hidden, latent) == FlatVAE(d, hidden, latent).params.numel()


@pytest.mark.slow
def test_store_runs_tiny(tmp_path):
    from benchmarks import store

    store.main(["--quick", "--tasks", "2", "--variants", "gauss", "--dims", "768",
                "--noise-control", "1", "--out-dir", str(tmp_path)])
    doc = _load(tmp_path, "store")
    rows = {(r["option"], r["precision"]): r for r in doc["rows"]}
    assert rows[("gauss store", "fp32")]["bytes/class D=768"] == 2 * 768 * 4
    assert rows[("gauss store", "fp16")]["bytes/class D=768"] == 2 * 768 * 2
    assert all(0 <= r["final_avg_acc"] <= 100 for r in doc["rows"])
    assert len(doc["meta"]["noise_control"]) == 1


def test_store_bytes_of_default_vae():
    """The reference VAE decoder at D = 768: the arithmetic the store table rests on."""
    from benchmarks.store import generator_group, store_bytes

    group = generator_group("vae", {}, 768, 2)
    params = (256 * 512 + 512) + (512 * 512 + 512) + (512 * 768 + 768) + 2 * 768  # + norm scale/shift
    assert store_bytes(group.state_dict(), "fp32", 2) == params * 4
    assert store_bytes(group.state_dict(), "fp16", 2) == params * 2
    assert store_bytes(group.state_dict(), "int8", 2) < 1_000_000


@pytest.mark.slow
def test_accuracy_runs_tiny(tmp_path):
    from benchmarks import accuracy

    accuracy.main(["--quick", "--tasks", "2", "--generators", "gauss", "--baselines", "zeroshot",
                   "--out-dir", str(tmp_path)])
    doc = _load(tmp_path, "accuracy-digits-cgil-tiny")
    assert [r["run"] for r in doc["rows"]] == ["cgil-gauss", "zeroshot"]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert any(p.endswith(".curves.png") for p in pngs) and sum(p.endswith(".heatmap.png") for p in pngs) == 2


def test_cli_lists_benchmarks():
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for name in ("update", "accuracy", "store"):
        assert name in result.output


@pytest.mark.slow
def test_accuracy_runs_on_a_folder_dataset(tmp_path):
    import numpy as np
    from PIL import Image

    from benchmarks import accuracy

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(["red_square", "blue_circle"]):
            d = tmp_path / "data" / split / name
            d.mkdir(parents=True)
            for i in range(4):
                img = np.zeros((16, 16, 3), np.uint8)
                img[..., 0 if c == 0 else 2] = 200 + rng.integers(0, 50)
                Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "out"
    accuracy.main(["--quick", "--dataset", f"folder:{tmp_path / 'data'}", "--generators", "gauss",
                   "--baselines", "joint", "--out-dir", str(out)])
    doc = _load(out, "accuracy-data-cgil-tiny")
    assert doc["meta"]["settings"]["dataset"].startswith("folder:") and len(doc["rows"]) == 2


@pytest.mark.slow
def test_alignment_runs_tiny(tmp_path):
    from benchmarks import alignment

    alignment.main(["--quick", "--out-dir", str(tmp_path)])
    doc = _load(tmp_path, "alignment-quick")
    assert [(r["classes"], r["variant"].split(",")[0]) for r in doc["rows"]] == [
        (10, "all classes (reference)"), (10, "sampled"), (40, "all classes (reference)"), (40, "sampled")]
    assert all(r["epoch_cpu_s"] > 0 and 0 <= r["accuracy"] <= 100 for r in doc["rows"])
