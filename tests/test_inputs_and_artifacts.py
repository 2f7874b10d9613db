"""User folders, local checkpoints, and durable artifacts: bad input is refused clearly, nothing is lost."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from runtime.artifacts import current_dir, publish_version, verify_manifest

from cgil.tensor_io import load_tensors, save_tensors
from cgil.clip import create_clip
from cgil.data import get_dataset
from runtime.errors import CgilError
from cgil.features import task_features
from cgil.state import load_learner, state_dir
from cli import app

CLASSES = ["red_apple", "banana", "cherry"]


def write_image(path, kind, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "rgba":
        Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "RGBA").save(path)
    elif kind == "gray16":
        Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)).save(path)
    elif kind == "palette":
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("P").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(path)


def make_folder(root, per_class=4):
    kinds = ["rgb", "rgba", "gray16", "palette"]
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", kinds[i % 4], seed=hash((split, c, i)) % 2**32)
    return root


@pytest.mark.slow
def test_folder_dataset_reads_layout_and_trains_end_to_end(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = get_dataset(f"folder:{root}")
    assert ds.classnames == ["banana", "cherry", "red apple"]  # sorted folders, underscores as spaces
    assert len(ds.train) == 12 and len(ds.test) == 12
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--dataset", f"folder:{root}", "--tasks", "3", "--epochs", "2",
                                      "--passes", "2", "--generator", "gauss", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == [[c] for c in metrics["class_order"]]


def test_folder_with_empty_class_names_the_folder(tmp_path):
    root = make_folder(tmp_path / "data")
    for f in (root / "test" / "cherry").iterdir():
        f.unlink()
    with pytest.raises(CgilError, match=r"empty class folder: .*test/cherry"):
        get_dataset(f"folder:{root}")


def test_folder_with_class_missing_from_test_is_refused(tmp_path):
    root = make_folder(tmp_path / "data")
    for f in (root / "test" / "banana").iterdir():
        f.unlink()
    (root / "test" / "banana").rmdir()
    with pytest.raises(CgilError, match="missing from .*test: banana"):
        get_dataset(f"folder:{root}")


def test_unreadable_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "banana" / "broken.png"
    bad.write_bytes(b"this is not a png")
    ds = get_dataset(f"folder:{root}")  # skipped with a warning (issue 13); --strict refuses it by name
    assert str(bad) not in ds.train.items and len(ds.train) == 12
    with pytest.raises(CgilError, match=r"unreadable image\(s\) .*broken\.png"):
        get_dataset(f"folder:{root}", strict=True)
    truncated = root / "train" / "banana" / "0.png"  # a header that reads, pixels that do not
    truncated.write_bytes(truncated.read_bytes()[:60])
    ds = get_dataset(f"folder:{root}")
    clip = create_clip("cgil-tiny")
    with pytest.raises(CgilError, match=r"cannot read image .*0\.png"):
        task_features(clip, ds, "train", [0], cache_dir=None)


@pytest.mark.slow
def test_local_checkpoint_file_loads_exactly_those_weights(tmp_path):
    source = create_clip("cgil-tiny", seed=0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), ckpt)
    loaded = create_clip("cgil-tiny", pretrained=str(ckpt), seed=12345)  # the seed must not matter now
    assert loaded.identity.weights_id.startswith("sha256:")
    assert loaded.identity.pretrained == str(ckpt)
    for (name, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(source.encode_images(pixels), loaded.encode_images(pixels), atol=0, rtol=0)
    other = create_clip("cgil-tiny", seed=1)
    assert other.identity.weights_id != loaded.identity.weights_id


def test_state_from_another_model_is_refused(tiny_run):
    other = create_clip("cgil-tiny", seed=99)
    with pytest.raises(CgilError, match="was made with cgil-tiny"):
        load_learner(state_dir(tiny_run), other)


def test_corrupt_or_truncated_files_are_detected(tmp_path):
    def write(d):
        save_tensors(d / "a.safetensors", {"x": torch.arange(10.0)})
        (d / "b.json").write_text("{}")

    root = tmp_path / "versions"
    publish_version(root, "v1", write, kind="test")
    d = current_dir(root)
    verify_manifest(d, kind="test")
    (d / "b.json").write_text("[]")  # same size, other bytes
    with pytest.raises(CgilError, match=r"b\.json does not match its sha256"):
        verify_manifest(d)
    data = (d / "a.safetensors").read_bytes()
    (d / "a.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CgilError, match="corrupt tensor file"):
        load_tensors(d / "a.safetensors")
    with pytest.raises(CgilError, match="holds a 'test', expected a 'bundle'"):
        (d / "b.json").write_text("{}")
        save_tensors(d / "a.safetensors", {"x": torch.arange(10.0)})
        verify_manifest(d, kind="bundle")


def test_failed_write_leaves_the_previous_version_current(tmp_path):
    root = tmp_path / "versions"
    publish_version(root, "v1", lambda d: (d / "f.txt").write_text("one"), kind="test")

    def crash(d):
        (d / "f.txt").write_text("half")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        publish_version(root, "v2", crash, kind="test")
    assert current_dir(root).name == "v1" and (current_dir(root) / "f.txt").read_text() == "one"
    assert not (root / "v2").exists() and not list(root.glob(".v2.*"))
    publish_version(root, "v2", lambda d: (d / "f.txt").write_text("two"), kind="test")
    publish_version(root, "v3", lambda d: (d / "f.txt").write_text("three"), kind="test")
    assert current_dir(root).name == "v3" and (root / "v2").exists() and not (root / "v1").exists()
