"""`cgil predict` and `cgil export` through the real Typer app."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import BLOCK_TORCH


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """One file per awkward kind of image, plus a file that is not an image at all."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(d / "gray16.png")
    assert Image.open(d / "gray16.png").mode.startswith("I;16")
    (d / "notes.txt").write_text("not an image, and not picked up from a folder")
    return d


def _app():
    from cli import app

    return app


def test_predict_table_for_every_image_mode(fp32_bundle, image_dir):
    result = CliRunner().invoke(_app(), ["predict", str(fp32_bundle), str(image_dir), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    for name in ("rgb.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png"):
        assert name in result.output
    assert "notes.txt" not in result.output


def test_predict_json_lines_and_a_bad_file_fails_alone(fp32_bundle, image_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    result = CliRunner().invoke(_app(), ["predict", str(fp32_bundle), str(image_dir / "rgb.png"), str(bad),
                                         str(image_dir / "cmyk.jpg"), "--json", "--top-k", "3"])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["file"]).name for r in lines] == ["rgb.png", "broken.png", "cmyk.jpg"]
    assert "cannot read image" in lines[1]["error"] and "labels" not in lines[1]
    for r in (lines[0], lines[2]):
        assert len(r["labels"]) == 3 and 0 < r["scores"][1] <= r["scores"][0] <= 1


def test_predict_backends_agree(fp32_bundle, image_dir):
    outputs = []
    for backend in ("onnxruntime", "torch"):
        result = CliRunner().invoke(_app(), ["predict", str(fp32_bundle), str(image_dir / "rgb.png"), "--json",
                                             "--backend", backend])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.stdout.splitlines()[0]))
    assert outputs[0]["labels"] == outputs[1]["labels"]
    np.testing.assert_allclose(outputs[0]["similarities"], outputs[1]["similarities"], atol=1e-4)


def test_predict_on_a_broken_bundle_is_a_one_line_error(tmp_path, image_dir):
    result = CliRunner().invoke(_app(), ["predict", str(tmp_path), str(image_dir / "rgb.png")])
    assert result.exit_code == 2
    assert "not a complete cgil-bundle" in result.output and "Traceback" not in result.output


def test_export_command_refuses_to_overwrite_and_reports_checks(fp32_bundle, tiny_run, tmp_path):
    result = CliRunner().invoke(_app(), ["export", str(tiny_run), "--out", str(fp32_bundle)])
    assert result.exit_code == 2 and "--force" in result.output
    out = tmp_path / "b"
    result = CliRunner().invoke(_app(), ["export", str(tiny_run), "--out", str(out), "--no-text", "--max-batch", "4"])
    assert result.exit_code == 0, result.output
    assert "check image_fp32: min_cosine_vs_torch=" in result.output
    assert json.loads((out / "manifest.json").read_text())["max_batch"] == 4


def test_cgil_predict_runs_where_torch_cannot_be_imported(fp32_bundle, image_dir):
    """A device without torch: the whole CLI path (cli.py, every registered command module) must not need it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    script = BLOCK_TORCH + f"""
sys.path.insert(0, {str(root)!r})
from cli import app
app(["predict", {str(fp32_bundle)!r}, {str(image_dir / "gray16.png")!r}, "--json"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["file"].endswith("gray16.png")
