"""End-to-end runs on digits: learning beats forgetting, resume is exact, run files are complete."""
import json

import pytest
import torch
from typer.testing import CliRunner

from runtime.artifacts import verify_manifest

from cgil.tensor_io import load_tensors
from runtime.errors import CgilError
from cgil.progress import Reporter
from cgil.state import state_dir
from cgil.train import run
from cli import app
from conftest import tiny_config

QUIET = Reporter(enabled=False)
METRIC_KEYS = {"method", "generator", "model", "pretrained", "seed", "class_order", "tasks", "accuracy_matrix",
               "task_il_matrix", "final_avg_acc", "final_pooled_acc", "avg_incremental_acc", "forgetting",
               "transfer", "transfer_matrix", "timings"}


def load_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_run_directory_is_complete(tiny_run):
    for name in ("config.json", "metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png"):
        assert (tiny_run / name).is_file(), name
    m = load_metrics(tiny_run)
    assert METRIC_KEYS <= set(m)
    assert set(m["timings"]) == {"features", "generators", "alignment", "eval"}
    assert len(m["accuracy_matrix"]) == 5 and len(m["tasks"]) == 5
    assert sorted(c for t in m["tasks"] for c in t) == list(range(10))
    last = m["accuracy_matrix"][-1]
    assert all(0 <= a <= 100 for a in last)
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["class_order"] == m["class_order"] and "torch" in config["versions"]
    current = state_dir(tiny_run)
    manifest = verify_manifest(current)
    assert {"head.safetensors", "head.json", "prompts.safetensors", "store.safetensors"} <= set(manifest["files"])
    keys = load_tensors(current / "head.safetensors")["keys"]
    assert keys.shape == (10, 64)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(10))
    assert (tiny_run / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cgil_beats_sequential_without_replay(tiny_run, tmp_path):
    cgil = load_metrics(tiny_run)
    sequential = run(tiny_config(method="sequential"), tmp_path / "seq", reporter=QUIET)
    assert cgil["final_avg_acc"] >= sequential["final_avg_acc"] + 5.0, (cgil["final_avg_acc"], sequential["final_avg_acc"])
    assert cgil["forgetting"] < sequential["forgetting"]


def test_resume_equals_uninterrupted(tiny_run, tmp_path):
    out = tmp_path / "interrupted"
    assert run(tiny_config(method="cgil"), out, stop_after=1, reporter=QUIET) is None
    assert json.loads((state_dir(out) / "progress.json").read_text())["finished_task"] == 1
    resumed = run(tiny_config(method="cgil"), out, resume=True, reporter=QUIET)
    reference = load_metrics(tiny_run)
    for key in ("accuracy_matrix", "task_il_matrix", "transfer_matrix", "final_avg_acc", "forgetting"):
        assert resumed[key] == reference[key], key
    torch.testing.assert_close(load_tensors(state_dir(out) / "head.safetensors")["keys"],
                               load_tensors(state_dir(tiny_run) / "head.safetensors")["keys"], atol=0, rtol=0)


def test_resume_with_other_settings_is_refused_and_says_which(tiny_run):
    with pytest.raises(CgilError, match=r"align\.lr.*generator\.kind|generator\.kind.*align\.lr"):
        run(tiny_config(method="cgil", lr=0.5, generator="mog"), tiny_run, resume=True, reporter=QUIET)


def test_existing_run_is_not_overwritten_without_resume(tiny_run):
    before = (tiny_run / "metrics.json").read_bytes()
    with pytest.raises(CgilError, match="already holds a run"):
        run(tiny_config(method="cgil"), tiny_run, reporter=QUIET)
    assert (tiny_run / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_zeroshot_and_joint_baselines_run(tmp_path):
    zs = run(tiny_config(method="zeroshot"), tmp_path / "zs", reporter=QUIET)
    joint = run(tiny_config(method="joint"), tmp_path / "joint", reporter=QUIET)
    assert zs["generator"] is None and 0 <= zs["final_avg_acc"] <= 100
    # zero-shot never learns: its transfer equals its own accuracy on future classes, always defined
    assert zs["transfer"] is not None
    assert joint["final_avg_acc"] > zs["final_avg_acc"]


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'; choose one of: "),
    (["--model", "ViT-Q-99"], "unknown model 'ViT-Q-99'; choose one of: "),
    (["--generator", "gan"], "unknown generator 'gan'; choose one of: vae, mog, gauss, diffusion"),
    (["--method", "ewc"], "unknown method 'ewc'; choose one of: cgil, zeroshot, joint, sequential, all"),
    (["--pretrained", "no-such-tag"], "neither a checkpoint file nor a known tag"),
    (["--resume"], "--resume needs --out"),
    (["--vae-objective", "textbok"], "unknown VAE objective 'textbok' (did you mean 'textbook'?); choose one of: reference, textbook"),
    (["--mog-estep", "em"], "unknown MoG E-step 'em'; choose one of: exact, reference"),
])
def test_cli_bad_input_is_a_one_line_error(args, needle, tmp_path):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--quiet", *args]
                                if "--resume" not in args else ["train", *args])
    assert result.exit_code == 2
    assert needle in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_cli_eval_and_info(tiny_run):
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(tiny_run)])
    assert info.exit_code == 0, info.output
    doc = json.loads(info.output)
    assert len(doc["classes"]) == 10 and doc["bytes"]["store.safetensors"] > 0
    evaluated = runner.invoke(app, ["eval", str(tiny_run)])
    assert evaluated.exit_code == 0, evaluated.output
    final = load_metrics(tiny_run)["final_avg_acc"]
    assert f"{final:.2f}" in evaluated.output  # re-evaluation reproduces the saved final accuracy


@pytest.mark.slow
def test_cli_generator_options_reach_the_saved_config(tmp_path):
    import json

    import cli
    from cgil.generators.mog import MOG_ESTEPS
    from cgil.generators.vae import VAE_OBJECTIVES

    assert cli.VAE_OBJECTIVES == VAE_OBJECTIVES and cli.MOG_ESTEPS == MOG_ESTEPS  # the early check stays in step
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--quiet", "--generator", "mog", "--tasks", "2",
                                      "--epochs", "1", "--mog-estep", "reference", "--vae-objective", "textbook"])
    assert result.exit_code == 0, result.output
    generator = json.loads((out / "config.json").read_text())["settings"]["generator"]
    assert (generator["mog_estep"], generator["vae_objective"]) == ("reference", "textbook")
