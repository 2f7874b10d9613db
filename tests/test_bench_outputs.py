"""Benchmarks never write into the checkout unless asked: results go outside it (or to --out), and only
`make bench-tables` (benchmarks.readme --publish) copies chosen results into benchmarks/results."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (".gitignore", "pyproject.toml", "README.md", "cli.py", "cgil", "export", "runtime", "benchmarks", "docs")


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_a_benchmark_run_in_a_clone_leaves_the_clone_clean(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "clone"
    clone.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCES:
        src = ROOT / name
        (shutil.copytree(src, clone / name, ignore=ignore) if src.is_dir() else shutil.copy(src, clone / name))
    _git(clone, "init", "-q")
    _git(clone, "add", "-A")
    _git(clone, "commit", "-q", "-m", "clone")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "CGIL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # the clone's own code runs (its folder comes first on sys.path), as after `git clone && cgil bench ...`
    out = subprocess.run([sys.executable, "-m", "cli", "bench", "alignment", "--quick"], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    written = sorted(p.name for p in (tmp_path / "cache" / "bench").iterdir())
    assert any(n.startswith("alignment-quick-") and n.endswith(".json") for n in written), written


@pytest.mark.slow  # imports every benchmark script (torch, onnxruntime, ...)
def test_every_benchmark_takes_out(capsys):
    import importlib

    from benchmarks.commands import available

    for name in available():
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(f"benchmarks.{name}").main(["--help"])
        assert exit_.value.code == 0
        assert "--out" in capsys.readouterr().out, name


def test_results_go_outside_the_checkout_by_default(monkeypatch, tmp_path):
    from benchmarks.common import write_results

    monkeypatch.setenv("CGIL_CACHE", str(tmp_path / "cache"))
    path = write_results("demo", [{"a": 1}], {"command": "x"})
    assert path.parent == tmp_path / "cache" / "bench" and path.is_file() and path.with_suffix(".md").is_file()
    assert ROOT not in path.parents


def test_publish_copies_chosen_results_with_their_figures(tmp_path):
    from benchmarks.readme import publish

    out = tmp_path / "bench"
    out.mkdir()
    (out / "demo-cpu-2c.md").write_text("# demo\n\nFigures: `demo-cpu-2c.curves.png`\n")
    (out / "demo-cpu-2c.json").write_text("{}\n")
    (out / "demo-cpu-2c.curves.png").write_bytes(b"\x89PNG")
    (out / "other-cpu-2c.md").write_text("# other\n")
    results = tmp_path / "results"
    written = publish([out / "demo-cpu-2c.json"], results)
    assert sorted(p.name for p in written) == ["demo-cpu-2c.curves.png", "demo-cpu-2c.json", "demo-cpu-2c.md"]
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in written)  # the other stays out
    with pytest.raises(SystemExit, match="nothing to publish"):
        publish([out / "missing.json"], results)
