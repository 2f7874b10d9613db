"""Newcomer stumbles on real photos (issue 17, items 11-16): real CLI commands on generated folders of small images.

Every failing command is checked for one `error:` line and its exit code, never a traceback; the
item-17 details are in test_newcomer_3.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_newcomer import assert_one_line_error, invoke, make_folder

ROOT = Path(__file__).resolve().parent.parent
TINY = ("--quiet", "--passes", "1", "--epochs", "1")


def flat_folder(root: Path, classes: dict[str, int]) -> Path:
    """PATH/<class>/*.png: the layout a phone export or an ImageFolder tutorial gives (no train/, no test/)."""
    make_folder(root / "tmp", classes, test=False)
    (root / "tmp" / "train").rename(root / "flat")
    (root / "tmp").rmdir()
    return root / "flat"


# ---------------------------------------------------------------- item 11: paths that work from anywhere

@pytest.fixture(scope="module")
def relative_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run started with a relative folder: path and a relative --out, from the dataset's parent folder."""
    import os

    home = tmp_path_factory.mktemp("home")
    make_folder(home / "photos", {"coins": 4, "keys": 4})
    before = Path.cwd()
    os.chdir(home)
    try:
        result = invoke("train", *TINY, "--dataset", "folder:photos", "--tasks", "2", "--out", "runs/mine")
    finally:
        os.chdir(before)
    assert result.exit_code == 0, result.output
    return home, home / "runs" / "mine"


def test_config_json_holds_absolute_paths(relative_run):
    home, run = relative_run
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings["dataset"] == f"folder:{(home / 'photos').resolve()}"


def test_resume_config_and_eval_work_from_another_directory(relative_run, tmp_path, monkeypatch):
    home, run = relative_run
    monkeypatch.chdir(tmp_path)  # where photos/ does not exist
    result = invoke("train", "--out", run, "--resume")  # not --quiet: the cached phases show full bars
    assert result.exit_code == 0, result.output
    assert "0/?" not in result.output  # item 17: a phase the cache answered is a full bar
    result = invoke("train", "--quiet", "--config", run / "config.json", "--out", "again", "--epochs", "2")
    assert result.exit_code == 0, result.output
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    assert "task 2:" in result.output


def test_the_interrupt_hint_is_an_absolute_command(monkeypatch, tmp_path):
    import cgil.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cgil.train, "run", interrupted)
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--quiet", "--out", "runs/r1")
    assert result.exit_code == 130
    assert f"Continue with: cgil train --out {tmp_path / 'runs' / 'r1'} --resume" in result.output


# ---------------------------------------------------------------- item 12: update --data reads folders as train does

def test_update_skips_unreadable_files_with_one_warning_and_strict_aborts(bundle, new_digits, tmp_path):
    import shutil

    data = tmp_path / "new"
    shutil.copytree(new_digits, data)
    (data / "nine" / "._IMG_0001.png").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (data / "eight" / "notes.jpg").write_text("not an image")
    before = (bundle / "heads" / "CURRENT").read_text()
    assert_one_line_error(invoke("update", bundle, "--data", data, "--strict"), 2,
                          "2 unreadable image(s)", "._IMG_0001.png", "notes.jpg")
    assert (bundle / "heads" / "CURRENT").read_text() == before  # nothing published

    result = invoke("update", bundle, "--data", data, "--epochs", "1", "--passes", "1")
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped 2 unreadable image(s)") == 1
    assert result.output.count("published") == 1  # item 17: said once
    counts = json.loads(invoke("store", "info", bundle, "--json").output)
    images = {row["class"]: row["images"] for row in counts["classes"]}
    assert images["eight"] == images["nine"] == 40  # the junk counts nowhere


def test_update_with_only_unreadable_files_in_a_class_names_it(bundle, tmp_path):
    (tmp_path / "new" / "forklift").mkdir(parents=True)
    (tmp_path / "new" / "forklift" / "a.png").write_text("broken")
    assert_one_line_error(invoke("update", bundle, "--data", tmp_path / "new"), 2,
                          "empty class folder", "forklift", "no readable images")


# ---------------------------------------------------------------- item 13: the layouts people have

def test_a_flat_class_folder_is_split_automatically(tmp_path):
    from cgil.data import get_dataset

    flat = flat_folder(tmp_path, {"coins": 10, "keys": 5})
    ds = get_dataset(f"folder:{flat}")
    assert ds.class_counts() == {"train": {"coins": 8, "keys": 4}, "test": {"coins": 2, "keys": 1}}
    assert ds.meta["held_out"] == "20% of each class held out as the test split"
    assert get_dataset(f"folder:{flat}", val_split=0.4).class_counts()["test"] == {"coins": 4, "keys": 2}
    result = invoke("data", "check", f"folder:{flat}")
    assert result.exit_code == 0 and "coins" in result.output, result.output


def test_val_is_read_as_the_test_split_and_test_without_train_says_the_layout(tmp_path):
    from cgil.data import get_dataset

    root = make_folder(tmp_path / "yolo", {"coins": 3, "keys": 3})
    (root / "test").rename(root / "val")  # ultralytics' train/ + val/
    assert get_dataset(f"folder:{root}").class_counts()["test"] == {"coins": 2, "keys": 2}
    (root / "train").rename(root / "elsewhere")
    result = invoke("train", "--dataset", f"folder:{root}")
    assert_one_line_error(result, 2, "has 'val/' but no 'train/'", f"{root}/train/<class>/*")


def test_a_folder_without_images_says_which_layouts_work(tmp_path):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    assert_one_line_error(invoke("train", "--dataset", f"folder:{tmp_path / 'empty'}"), 2,
                          "holds no class folders of images", "PATH/<class>/*", "PATH/train/<class>/*")


# ---------------------------------------------------------------- item 14: runs are not bundles; serve tells the truth

@pytest.mark.parametrize("args", [["predict", "{run}", "{run}/config.json"], ["serve", "{run}"],
                                  ["store", "info", "{run}"], ["update", "{run}", "--zero-shot", "forklift"],
                                  ["update", "--rollback", "{run}"]])
def test_a_training_run_where_a_bundle_is_expected_says_export_it(tiny_run, args):
    result = invoke(*[a.format(run=tiny_run) for a in args])
    assert_one_line_error(result, 2, "is a training run", f"cgil export {tiny_run} --out BUNDLE")


def test_a_method_all_folder_names_a_run_to_export(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "all" / "cgil")
    assert_one_line_error(invoke("serve", tmp_path / "all"), 2, "holds training runs (cgil)",
                          f"cgil export {tmp_path / 'all' / 'cgil'} --out BUNDLE")


def _serve(bundle_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "serve", str(bundle_dir), "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_serve_announces_itself_only_when_it_answers(fp32_bundle):
    import httpx

    from benchmarks.serve import free_port

    port = free_port()
    proc = _serve(fp32_bundle, port)
    try:
        line = proc.stdout.readline()  # blocks until the announcement (or exit)
        assert line.startswith(f"serving {fp32_bundle} on http://127.0.0.1:{port}"), line + proc.stderr.read()
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)  # at once: no connection refused
        assert ready.status_code == 200, ready.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_on_a_busy_port_fails_in_one_line_without_announcing(fp32_bundle):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve(fp32_bundle, port)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    assert "serving" not in out and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


# ---------------------------------------------------------------- item 15: every argument checked before torch loads

CHEAP_REFUSALS = [
    (["--generator", "vea"], "did you mean 'vae'"),
    (["--pretrained", "{tmp}/missing.pt"], "no such checkpoint file"),
    (["--pretrained", "{tmp}/notes.txt"], "is a text file, not a checkpoint"),
    (["--pretrained", "{tmp}"], "is a directory"),
    (["--tasks", "0"], "--tasks must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--dataset", "folder:{tmp}/nowhere"], "does not exist"),
    (["--dataset", "folder:{tmp}/photos", "--val-split", "0.2"], "already has a 'test/'"),
    (["--out", "{tmp}/done"], "already holds a run"),
]


def test_bad_arguments_fail_before_torch_is_imported(tmp_path):
    """In a fresh process: the refusal comes before `import torch` (6 s on a laptop), and names the fix."""
    make_folder(tmp_path / "photos", {"coins": 3, "keys": 3})
    (tmp_path / "notes.txt").write_text("weights are in the other folder\n")
    (tmp_path / "done" / "state").mkdir(parents=True)
    (tmp_path / "done" / "state" / "CURRENT").write_text("task-000")
    script = """
import json, sys
from typer.testing import CliRunner
from cli import app
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, ["train", "--quiet", *args])
    out.append([r.exit_code, r.output, "torch" in sys.modules])
print(json.dumps(out))
"""
    cases = [[a.format(tmp=tmp_path) for a in args] for args, _ in CHEAP_REFUSALS]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for (code, output, torch_loaded), (args, needle) in zip(json.loads(done.stdout), CHEAP_REFUSALS):
        assert code == 2 and needle in output and output.count("error:") == 1, (args, output)
        assert not torch_loaded, f"{args}: torch was imported before the refusal"
    assert time.perf_counter() - start < 60


def test_the_cli_knows_every_generator_without_importing_them():
    from cgil.generators import GENERATORS
    from cli import GENERATOR_KINDS

    assert GENERATOR_KINDS == tuple(GENERATORS)


def test_a_text_file_as_pretrained_gives_no_pickle_advice(tmp_path):
    """Past the CLI's sniff (a torch.save file holding other objects than tensors), torch's advice to load
    it with weights_only=False (which runs the file's code) is not repeated."""
    import fractions

    import torch

    other = tmp_path / "objects.pt"
    torch.save({"scale": fractions.Fraction(1, 3)}, other)
    result = invoke("train", "--quiet", "--pretrained", other, "--out", tmp_path / "r")
    assert_one_line_error(result, 2, "cannot load this file into cgil-tiny", "not a torch.save file of tensors only")
    assert "weights_only" not in result.output and "\\u001b" not in result.output


# ---------------------------------------------------------------- item 16: small classes do not collapse

@pytest.mark.slow  # fits generators
def test_small_classes_get_enough_generator_steps_to_keep_their_variance(tmp_path):
    """A 12-image class under the folder: preset: 300 VAE steps, not 50, and a replay above the threshold."""
    import numpy as np
    import torch

    from cgil.clip import create_clip
    from cgil.config import TrainConfig
    from cgil.data import get_dataset
    from cgil.features import task_features
    from cgil.generators import make_generators
    from cgil.metrics import COLLAPSE_RATIO, variance_ratio

    cfg = TrainConfig.for_dataset("folder:/x")
    assert make_generators(cfg.generator, [0], 8).iterations([12, 400]) == [300, 350]
    assert TrainConfig.for_dataset("folder:/x", passes=2).generator.min_steps == 0  # --passes is obeyed
    root = make_folder(tmp_path / "photos", {"coins": 12, "keys": 3})
    ds = get_dataset(f"folder:{root}")
    feats, labels = task_features(create_clip(), ds, "train", [0], None)
    torch.set_num_threads(1)
    gen = make_generators(cfg.generator, [0], feats.shape[1])
    gen.fit([feats], seed=1992)
    replay = gen.sample(500, torch.Generator().manual_seed(0))[0]
    assert variance_ratio(replay.numpy(), feats.numpy()) > COLLAPSE_RATIO
    # The threshold itself is right for small classes: two real samples of 5 images of one class keep a
    # ratio near 1, far above 0.1, so a flagged class is a generator that collapsed, not a small class.
    rng = np.random.default_rng(0)
    ratios = [variance_ratio(rng.normal(size=(5, 64)), rng.normal(size=(5, 64))) for _ in range(200)]
    assert min(ratios) > 4 * COLLAPSE_RATIO


def test_the_collapse_warning_names_classes_and_what_to_try(relative_run):
    _, run = relative_run
    log = (run / "train.log").read_text()
    warning = next(line for line in log.splitlines() if "collapsed generator" in line)
    assert "'coins'" in warning or "'keys'" in warning
    assert "--passes, now 1" in warning and "--generator gauss" in warning and "more images" in warning
    info = json.loads(invoke("info", run).output)["replay_quality"]
    assert set(info["collapsed_class_names"]) <= {"coins", "keys"} and info["collapsed_class_names"]
