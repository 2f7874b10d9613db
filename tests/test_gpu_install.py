"""The documented GPU install (docs/gpu.md): exactly one ONNX Runtime wheel, with its CUDA and cuDNN wheels.

`pip install -r requirements-gpu.txt && pip install --no-deps .`: the list is pyproject's runtime
dependencies with `onnxruntime-gpu[cuda,cudnn]` in place of `onnxruntime` (checked offline), and pip
resolves it (`--dry-run --report`: metadata only, no wheel is downloaded) to one ORT distribution and
the NVIDIA libraries its CUDA provider loads. The resolution needs the package index; without it the
test is skipped and says why.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements-gpu.txt"


def _requirement_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_gpu_requirements_are_the_runtime_dependencies_with_the_gpu_wheel():
    import tomllib

    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [d.replace("onnxruntime>=1.18", "onnxruntime-gpu[cuda,cudnn]>=1.21") for d in core]
    assert _requirement_lines(REQUIREMENTS.read_text()) == wanted
    assert "onnxruntime>=1.18" in core  # the CPU runtime (`pip install .`) keeps the CPU wheel


def _index_reachable() -> str | None:
    """None when PyPI answers, else why not (the resolution test is skipped with that reason)."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/onnxruntime-gpu/", timeout=10) as r:
            r.read(1)
        return None
    except OSError as e:
        return f"the package index cannot be reached ({e})"


@pytest.mark.slow  # resolves against the package index
def test_the_documented_gpu_install_resolves_to_one_onnxruntime_with_its_cuda_libraries(tmp_path):
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("onnxruntime-gpu's CUDA wheels are resolved for Linux x86_64 only in this test")
    why = _index_reachable()
    if why:
        pytest.skip(why)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--only-binary=:all:", "--disable-pip-version-check", "--report", str(report),
                           "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("NewConnectionError", "Max retries", "timed out")):
        pytest.skip(f"the package index cannot be reached: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    installs = {i["metadata"]["name"].lower().replace("_", "-"): i for i in json.loads(report.read_text())["install"]}
    ort = sorted(n for n in installs if n in ("onnxruntime", "onnxruntime-gpu"))
    assert ort == ["onnxruntime-gpu"], f"the GPU install resolves {ort}: both write one package folder"
    assert sorted(installs["onnxruntime-gpu"].get("requested_extras") or []) == ["cuda", "cudnn"]
    # What the CUDA provider dlopens: the CUDA runtime, cuBLAS, cuFFT, cuRAND and cuDNN wheels.
    for lib in ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cufft", "nvidia-curand", "nvidia-cudnn"):
        assert any(n.startswith(lib) for n in installs), f"{lib}* missing from the GPU install: {sorted(installs)}"
