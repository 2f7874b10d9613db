"""The device install for real: the wheel alone, in a fresh venv, has no torch, yet predicts and serves.

The wheel is built from a copy of the sources and installed with `pip install cgil-*.whl` (the device
command of docs/install.md) from this machine's local wheel files only (`--no-index`), so the test is
offline. Wheels come from $CGIL_WHEELHOUSE (paths joined by os.pathsep) or the machine's local
package folders; without either the test skips and says so. About 30-60 s on two busy cores: the
fresh venv and its onnxruntime/numpy/fastapi wheels are the cost, built once for the module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_WHEEL_DIRS = ("/opt/pypi/files", "/opt/pypi-more/files", "/opt/wheels")
SOURCES = ("pyproject.toml", "README.md", "cli.py", "cgil", "export", "runtime", "benchmarks")


def wheelhouse() -> list[str]:
    given = os.environ.get("CGIL_WHEELHOUSE")
    dirs = given.split(os.pathsep) if given else [d for d in LOCAL_WHEEL_DIRS if Path(d).is_dir()]
    if not dirs:
        pytest.skip("no local wheel folder for an offline install: set CGIL_WHEELHOUSE")
    return [arg for d in dirs for arg in ("--find-links", d)]


def pip(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A fresh venv holding `pip install <the wheel>` and nothing else; returns its bin/ folder."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    for name in SOURCES:  # a copy: building a wheel writes build/ and *.egg-info next to the sources
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    links = wheelhouse()
    pip("wheel", "--no-deps", "--no-index", *links, "-w", str(work / "dist"), str(src))
    wheel = next((work / "dist").glob("cgil-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The device command, exactly: the wheel with no extra (pip runs from here into the fresh interpreter).
    pip("--python", str(venv / "bin" / "python"), "install", "--no-index", *links, str(wheel))
    return venv / "bin"


def run(bin_dir: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=bin_dir)  # not the repository: its sources must not shadow the install


def test_the_device_install_has_no_torch(device_venv):
    for module in ("torch", "open_clip", "torchvision", "sklearn", "matplotlib"):
        out = run(device_venv, "python", "-c", f"import {module}")
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, module
    out = run(device_venv, "python", "-c", "import cli, runtime; print(runtime.__file__)")
    assert out.returncode == 0 and "site-packages" in out.stdout, out.stderr


def test_device_install_predicts_and_updates_by_name(device_venv, fp32_bundle, tmp_path):
    from PIL import Image

    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(image)
    out = run(device_venv, "cgil", "predict", str(bundle), str(image), "--json", "--top-k", "2")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout.splitlines()[0])["labels"]) == 2
    out = run(device_venv, "cgil", "update", str(bundle), "--zero-shot", "forklift", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["added"] == ["forklift"]
    out = run(device_venv, "cgil", "update", "--rollback", str(bundle))
    assert out.returncode == 0, out.stderr


def test_device_install_serves(device_venv, fp32_bundle):
    from benchmarks.serve import free_port

    port = free_port()
    proc = subprocess.Popen([str(device_venv / "cgil"), "serve", str(fp32_bundle), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=device_venv)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "cgil serve did not become ready"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/classes", timeout=5) as r:
            assert json.loads(r.read())["classes"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("args", [
    ["train", "--quiet"], ["info", "{run}"], ["eval", "{run}"], ["export", "{run}", "--out", "{tmp}/b"],
    ["update", "{bundle}", "--data", "{tmp}"], ["bench", "store", "--quick"],
])
def test_learner_commands_name_the_extra_in_one_line(device_venv, fp32_bundle, tiny_run, tmp_path, args):
    args = [a.format(run=tiny_run, bundle=fp32_bundle, tmp=tmp_path) for a in args]
    out = run(device_venv, "cgil", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "pip install 'cgil[train]'" in out.stderr
    assert f"error: cgil {args[0]}" in out.stderr and "needs the learner" in out.stderr
