"""A newcomer's first hour (issue 13): one-line errors, folders like ImageFolder, resume that remembers.

Real files, the real Typer app, real training runs on tiny folders; every failing command is checked
for one `error:` line and the exit code (2 input/usage, 1 runtime), never a traceback.
"""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner



def _app():
    from cli import app

    return app


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(_app(), [str(a) for a in args], env=env)


def assert_one_line_error(result, code: int = 2, *needles: str) -> None:
    # CliRunner keeps an uncaught exception in result.exception: only a clean exit is a SystemExit.
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


def huge_png(path: Path, side: int = 15000) -> None:
    """A PNG whose header declares side x side pixels (225 MP): what a panorama or a scan looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def make_folder(root: Path, classes: dict[str, int], test: bool = True, nested: bool = False) -> Path:
    """root/train/<class>/ (optionally in batch sub-folders) and root/test/<class>/ of small seeded images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test") if test else ("train",):
        for k, (name, n) in enumerate(classes.items()):
            for i in range(n if split == "train" else 2):
                d = root / split / name / (f"batch{i % 2}" if nested and split == "train" else "")
                d.mkdir(parents=True, exist_ok=True)
                pixels = (rng.integers(0, 60, (16, 16, 3)) + 90 * k).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{name}_{i}.png")
    return root


# ---------------------------------------------------------------- item 2 and 3: one line, brackets intact

def test_pretrained_files_that_are_not_checkpoints_fail_in_one_line(tmp_path):
    import torch

    from cgil.clip import create_clip

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    other = tmp_path / "random.pt"
    torch.save({"a": torch.zeros(3)}, other)
    state = create_clip().model.state_dict()
    state["positional_embedding"] = torch.zeros(10, state["positional_embedding"].shape[1] + 8)
    wrong_arch = tmp_path / "other-architecture.pt"
    torch.save(state, wrong_arch)
    for path, needle in ((text, "is a text file, not a checkpoint"), (other, "cannot load this file into cgil-tiny"),
                         (wrong_arch, "cannot load this file into cgil-tiny")):
        out = tmp_path / "run"
        result = invoke("train", "--quiet", "--pretrained", path, "--out", out)
        assert_one_line_error(result, 2, str(path), needle)
        assert not out.exists(), "a refused run must leave no run directory"


def test_pretrained_tag_offline_fails_fast(tmp_path):
    import time

    start = time.perf_counter()
    result = invoke("train", "--quiet", "--model", "ViT-B-32", "--pretrained", "openai", "--out", tmp_path / "r",
                    env={"CGIL_OFFLINE": "1"})
    assert_one_line_error(result, 2, "not cached", "local checkpoint file")
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("args,needles", [
    (["train", "--dataset", "folder:{tmp}/x/[nope]", "--out", "{tmp}/brack[v2]"], ["{tmp}/x/[nope]"]),
    (["train", "--dataset", "digts"], ["did you mean 'digits'"]),
    (["train", "--dataset", "{tmp}"], ["folder:{tmp}"]),
    (["train", "--method", "cgl"], ["did you mean 'cgil'"]),
    (["train", "--device", "tpu"], ["unknown device"]),
    (["train", "--resume"], ["--resume needs --out"]),
    (["train", "--resume", "--out", "{tmp}/none"], ["nothing to resume"]),
    (["eval", "{tmp}"], ["not a cgil run"]),
    (["info", "{tmp}/missing"], ["not a cgil run"]),
    (["export", "{tmp}", "--out", "{tmp}/b"], ["{tmp}"]),
    (["predict", "{tmp}", "{tmp}"], ["{tmp}"]),
    (["serve", "{tmp}/[b]"], ["{tmp}/[b]"]),
    (["update", "{tmp}", "--zero-shot", "x"], ["{tmp}"]),
    (["update", "--rollback", "{tmp}"], ["{tmp}"]),
    (["store", "info", "{tmp}"], ["{tmp}"]),
    (["data", "check", "cub201"], ["did you mean 'cub200'"]),
    (["data", "check", "folder:{tmp}/[nope]"], ["{tmp}/[nope]"]),
])
def test_every_command_fails_in_one_line_and_keeps_brackets(tmp_path, args, needles):
    result = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(result, 2, *[n.format(tmp=tmp_path) for n in needles])
    assert not (tmp_path / "brack[v2]").exists()


def test_tensorrt_hint_keeps_its_brackets(fp32_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    result = invoke("predict", fp32_bundle, img, "--backend", "tensorrt")
    assert_one_line_error(result, 2, "cgil[tensorrt]")


def test_an_internal_failure_is_one_line_with_exit_1(monkeypatch, tmp_path):
    import cgil.runs

    def broken(run_dir):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cgil.runs, "run_info", broken)
    assert_one_line_error(invoke("info", tmp_path), 1, "internal error: ZeroDivisionError: a bug", "CGIL_DEBUG=1")


# ---------------------------------------------------------------- item 4 and 5: folders

def test_folder_recurses_skips_unreadable_files_with_one_warning_and_strict_aborts(tmp_path, capsys):
    from cgil.data import get_dataset

    root = make_folder(tmp_path / "photos", {"coins": 4, "keys": 4}, nested=True)
    (root / "train" / "coins" / "batch0" / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    huge_png(root / "train" / "keys" / "panorama.png")
    ds = get_dataset(f"folder:{root}")
    assert ds.class_counts() == {"train": {"coins": 4, "keys": 4}, "test": {"coins": 2, "keys": 2}}
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped 2 unreadable image(s)" in err
    assert "._IMG_0001.jpg" in err and "panorama.png" in err and "225000000 pixels" in err
    with pytest.raises(Exception) as e:
        get_dataset(f"folder:{root}", strict=True)
    assert "2 unreadable image(s)" in str(e.value) and "panorama.png" in str(e.value)


def test_a_class_left_with_too_few_images_is_refused_by_name(tmp_path):
    from cgil.data import get_dataset
    from runtime.errors import CgilError

    root = make_folder(tmp_path / "photos", {"coins": 1, "keys": 3})
    with pytest.raises(CgilError, match="'coins' \\(1 in"):
        get_dataset(f"folder:{root}")
    (root / "train" / "keys" / "keys_0.png").write_text("broken")
    (root / "train" / "keys" / "keys_1.png").write_text("broken")
    shutil.copy(root / "train" / "keys" / "keys_2.png", root / "train" / "coins" / "c2.png")
    with pytest.raises(CgilError, match="'keys' \\(1 in"):
        get_dataset(f"folder:{root}")


def test_val_split_is_stratified_seeded_and_only_for_a_folder_without_test(tmp_path):
    from cgil.data import get_dataset
    from runtime.errors import CgilError

    root = make_folder(tmp_path / "photos", {"coins": 10, "keys": 5}, test=False)
    assert get_dataset(f"folder:{root}").test.items == get_dataset(f"folder:{root}", val_split=0.2).test.items
    a = get_dataset(f"folder:{root}", val_split=0.2)  # 20% is also the default (issue 17, item 13)
    b = get_dataset(f"folder:{root}", val_split=0.2)
    assert a.class_counts() == {"train": {"coins": 8, "keys": 4}, "test": {"coins": 2, "keys": 1}}
    assert a.test.items == b.test.items and not set(a.test.items) & set(a.train.items)
    assert a.dataset_id != get_dataset(f"folder:{root}", val_split=0.4).dataset_id
    with pytest.raises(CgilError, match="already has a 'test/'"):
        get_dataset(f"folder:{make_folder(tmp_path / 'other', {'a': 3, 'b': 3})}", val_split=0.2)


def test_data_check_folder(tmp_path):
    root = make_folder(tmp_path / "photos", {"coins": 3, "keys": 3}, nested=True)
    result = invoke("data", "check", f"folder:{root}")
    assert result.exit_code == 0, result.output
    assert "coins" in result.output and "every image is readable" in result.output
    (root / "train" / "keys" / "._IMG_0002.jpg").write_bytes(b"junk")
    result = invoke("data", "check", f"folder:{root}")
    assert result.exit_code == 1 and "._IMG_0002.jpg" in result.output


def test_folder_defaults_are_the_measured_ones_and_stated_in_help():
    from cgil.config import TrainConfig

    cfg = TrainConfig.for_dataset("folder:/anywhere")
    assert (cfg.generator.passes, cfg.align.epochs) == (50, 20)
    assert TrainConfig.for_dataset("folder:/x", passes=7).generator.passes == 7
    text = invoke("train", "--help").output
    assert "Default: 50 for folder:PATH, 100 for digits" in " ".join(text.replace("│", " ").split())


# ---------------------------------------------------------------- item 6 and 8: runs that remember

@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    """A finished cgil run on a 3-class folder without test/ (held out by --val-split), tiny budgets."""
    tmp = tmp_path_factory.mktemp("folder-run")
    root = make_folder(tmp / "photos", {"coins": 6, "keys": 6, "rings": 6}, test=False, nested=True)
    out = tmp / "runs" / "mine[1]"
    result = invoke("train", "--quiet", "--dataset", f"folder:{root}", "--val-split", "0.34", "--tasks", "3",
                    "--passes", "2", "--epochs", "1", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_a_run_records_counts_log_per_class_accuracy_and_confusion(folder_run):
    config = json.loads((folder_run / "config.json").read_text())
    assert config["class_counts"]["train"] == {"coins": 4, "keys": 4, "rings": 4}
    assert config["settings"]["val_split"] == 0.34 and config["settings"]["device"] == "cpu"
    log = (folder_run / "train.log").read_text()
    assert "images per class (train/test): coins 4/2, keys 4/2, rings 4/2" in log and "task 3/3" in log
    rows = (folder_run / "per_class_accuracy.csv").read_text().splitlines()
    assert rows[0] == "class,name,test_images,accuracy" and len(rows) == 4
    assert Image.open(folder_run / "confusion_matrix.png").size[0] > 100
    matrix = (folder_run / "confusion_matrix.csv").read_text().splitlines()
    assert sum(int(v) for line in matrix[1:] for v in line.split(",")[1:]) == 6


def test_resume_reads_the_saved_settings_and_still_refuses_other_flags(folder_run):
    result = invoke("train", "--quiet", "--out", folder_run, "--resume")
    assert result.exit_code == 0, result.output
    assert_one_line_error(invoke("train", "--quiet", "--out", folder_run, "--resume", "--seed", "7"), 2,
                          "seed: 1992 (run) vs 7 (now)")


def test_config_replays_a_saved_run(folder_run, tmp_path):
    out = tmp_path / "again"
    result = invoke("train", "--quiet", "--config", folder_run / "config.json", "--out", out, "--epochs", "2")
    assert result.exit_code == 0, result.output
    old = json.loads((folder_run / "config.json").read_text())["settings"]
    new = json.loads((out / "config.json").read_text())["settings"]
    assert new["align"]["epochs"] == 2
    new["align"]["epochs"] = old["align"]["epochs"]
    assert new == old


def test_ctrl_c_prints_the_resume_command(monkeypatch, tmp_path):
    import cgil.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cgil.train, "run", interrupted)
    result = invoke("train", "--quiet", "--out", tmp_path / "r[1]")
    assert result.exit_code == 130
    assert f"Continue with: cgil train --out '{tmp_path / 'r[1]'}' --resume" in result.output


def test_info_lists_the_methods_of_a_method_all_run(tiny_run, tmp_path):
    for m in ("cgil", "joint"):
        shutil.copytree(tiny_run, tmp_path / "all" / m)
    result = invoke("info", tmp_path / "all")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert sorted(info["methods"]) == ["cgil", "joint"] and info["methods"]["cgil"]["classes"]
    assert_one_line_error(invoke("eval", tmp_path / "all"), 2, "one run per method (cgil, joint)")


def test_version_and_examples_in_every_help():
    from cli import EXAMPLES

    assert invoke("--version").output.startswith("cgil ")
    for command in EXAMPLES:
        result = invoke(*command.split(), "--help")
        assert result.exit_code == 0 and "Examples:" in result.output, command
        assert EXAMPLES[command][0] in result.output


def test_data_list_is_not_cut_when_piped():
    from cgil.data.catalog import default_root

    assert str(default_root("eurosat-rgb")) in invoke("data", "list").output


def test_keep_allows_more_than_one_rollback(fp32_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    for name in ("forklift", "pallet", "crate"):
        assert invoke("update", bundle, "--zero-shot", name, "--keep", "4").exit_code == 0
    for _ in range(3):
        result = invoke("update", "--rollback", bundle)
        assert result.exit_code == 0, result.output
    assert_one_line_error(invoke("update", "--rollback", bundle), 2, "no previous head version")


def test_update_announces_each_phase_before_it_runs(bundle, new_digits):
    from export.update import update_from_images

    lines: list[str] = []
    update_from_images(bundle, new_digits, epochs=1, passes=1, report=lines.append)
    starts = [next(i for i, line in enumerate(lines) if line.startswith(word))
              for word in ("embedding", "loading the text tower", "fitting", "realigning", "published")]
    assert starts == sorted(starts), lines


def test_long_plot_titles_are_wrapped_to_the_figure():
    from cgil.report import wrap_title

    title = "cgil class-IL accuracy (folder:/home/someone/Pictures/my-photo-collection/2024, ViT-B-16)"
    lines = wrap_title(title, 4.0, 9).splitlines()
    assert len(lines) > 1 and "".join(lines).replace(" ", "") == title.replace(" ", "")
    assert max(map(len, lines)) <= int(4.0 * 72 / (0.55 * 9))
