"""One rule per concern: where caches live, how warnings print, which export options a format takes."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from runtime.errors import CgilError


@pytest.mark.parametrize("value", ["", "CUSTOM"])
def test_every_cache_follows_one_rule(monkeypatch, tmp_path, value):
    """$CGIL_CACHE when set and not empty, else ~/.cache/cgil: features, TensorRT engines, the TensorRT EP alike."""
    from cgil.features import default_cache_dir
    from runtime.backends import provider_options
    from runtime.tensorrt_build import default_cache_dir as tensorrt_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CGIL_CACHE", str(tmp_path / value) if value else "")  # empty: it used to mean the cwd
    root = tmp_path / value if value else tmp_path / "home" / ".cache" / "cgil"
    assert default_cache_dir() == root
    assert tensorrt_cache_dir() == root / "tensorrt"
    graph = tmp_path / "image.onnx"
    graph.write_bytes(b"any graph")  # its folder is named by the file's sha256
    options = provider_options("TensorrtExecutionProvider", "fp16", graph)
    assert options["trt_engine_cache_path"].startswith(str(root / "ort-tensorrt") + "/")
    assert (root / "ort-tensorrt").is_dir()


def test_a_warning_is_one_escaped_line_like_an_error(capsys):
    from runtime.console import warn

    warn("skipped photos/[draft]\nfake: line\x1b[31m.png")
    err = capsys.readouterr().err
    assert err == "warning: skipped photos/[draft]\\u000afake: line\\u001b[31m.png\n"


@pytest.mark.parametrize("kwargs,message", [
    ({"triton_platform": "tensorrt"}, r"--triton-platform does not apply to --format onnx \(it takes --precision, "),
    ({"format": "tensorrt", "triton_platform": "tensorrt"}, "--triton-platform does not apply to --format tensorrt"),
    ({"min_agreement": 0.5}, "--min-agreement does not apply to an fp32 ONNX graph"),
])
def test_an_option_the_format_ignores_is_refused_before_any_work(tmp_path, kwargs, message):
    from export.bundle import export_bundle

    with pytest.raises(CgilError, match=message):  # no run is read: the run directory does not even exist
        export_bundle(tmp_path / "no-run", tmp_path / "b", **kwargs)
    assert not (tmp_path / "b").exists()


def test_the_cli_refuses_an_ignored_export_option_in_one_line(tmp_path):
    from cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "b"),
                                      "--triton-platform", "tensorrt"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --triton-platform does not apply to --format onnx")


def test_triton_still_takes_its_platform():
    from export.bundle import FORMAT_ARGS, check_format_args

    check_format_args("triton", {"triton_platform": "tensorrt", "precision": "fp16"})
    assert all(set(FORMAT_ARGS["triton"]) >= set(args) for args in FORMAT_ARGS.values())
