"""Newcomer stumbles, the smaller ones (issue 17, item 17): help, SIGTERM, warnings once, store counts,
update's device, the server's log, plot titles and the --method all comparison."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from test_newcomer import invoke, make_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [[], ["train"], ["store", "info"], ["data", "check"], ["update"]])
def test_dash_h_is_help(command):
    result = invoke(*command, "-h")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--help" in result.output and "Show this message" in result.output


@pytest.mark.slow  # trains
def test_sigterm_during_training_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "train", "--quiet", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("run directory:")  # printed as training starts
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert f"interrupted; finished tasks are saved. Continue with: cgil train --out {out} --resume" in err
    assert "Traceback" not in err


@pytest.mark.slow  # trains
def test_method_all_warns_once_about_skipped_files_and_plots_the_comparison(tmp_path):
    root = make_folder(tmp_path / "photos", {"coins": 3, "keys": 3})
    (root / "train" / "coins" / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    result = invoke("train", "--quiet", "--method", "all", "--dataset", f"folder:{root}", "--tasks", "1",
                    "--passes", "1", "--epochs", "1", "--out", tmp_path / "all")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "unreadable" in line]
    assert len(warnings) == 1, result.output  # once per run, not once per method
    assert warnings[0].count("._IMG_0001.jpg") == 1  # and each path once
    plot = tmp_path / "all" / "comparison.png"
    assert Image.open(plot).size[0] >= 600


def test_store_info_counts_the_images_of_exported_classes(fp32_bundle, tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    info = json.loads(invoke("store", "info", fp32_bundle, "--json").output)
    images = {row["class"]: row["images"] for row in info["classes"]}
    assert images == config["class_counts"]["train"]
    assert all(row["raw_features_bytes"] for row in info["classes"])


def test_update_device_defaults_to_auto_like_train(bundle, tmp_path):
    from export.update import update_from_images
    from runtime.errors import CgilError

    assert "auto (cuda if present" in " ".join(invoke("update", "-h").output.replace("│", " ").split())
    with pytest.raises(CgilError, match="is not a directory"):  # "auto" is accepted, as by train
        update_from_images(bundle, tmp_path / "nowhere", device="auto")


def test_a_refused_reload_is_logged_once_per_change(bundle, caplog):
    from runtime import Classifier
    from runtime.batching import HeadManager
    from runtime.heads import add_zero_shot
    from runtime.metrics import Metrics

    metrics = Metrics(8)
    heads = HeadManager(Classifier(bundle, backend="onnxruntime"), metrics, interval_s=0.01, retry_s=0.02)
    info = add_zero_shot(bundle, ["forklift"])
    (Path(info["directory"]) / "head.safetensors").write_bytes(b"bit rot")
    with caplog.at_level(logging.DEBUG, logger="cgil.serve"):
        heads.start()
        deadline = time.monotonic() + 30
        while metrics.reload_failures < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        heads.stop()
    assert metrics.reload_failures >= 5  # retried (and counted) all along
    errors = [r for r in caplog.records if r.name == "cgil.serve" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]


def test_plot_titles_name_the_dataset_not_its_path_and_task_axes_name_classes():
    from cgil.report import dataset_label, matrix_title, task_labels

    assert dataset_label("folder:/home/someone/Pictures/photos") == "folder:photos"
    assert dataset_label("digits") == "digits"
    metrics = {"method": "cgil", "dataset": "folder:/home/someone/Pictures/photos", "model": "ViT-B-16"}
    assert matrix_title(metrics) == "cgil class-IL accuracy (folder:photos, ViT-B-16)"
    labels = task_labels([[2, 0], [1, 3, 4, 5]], ["coins", "keys", "rings", "a very long class name indeed", "x", "y"])
    assert labels == ["T1: rings, coins", "T2: keys, a very long class…, x +1"]
