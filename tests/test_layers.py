"""The layering contract (cli > export > cgil > runtime; runtime torch-free) holds, and would catch a break."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("runtime", "cgil", "export", "benchmarks")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("runtime/bundle.py", "import cgil.config", "benchmarks > export > cgil > runtime"),
    ("runtime/heads.py", "import torch", "runtime imports no torch"),
    ("cgil/metrics.py", "import export.quantize", "benchmarks > export > cgil > runtime"),
    ("export/triton.py", "import cli", "cli.py is the composition root"),
])
def test_the_contracts_break_when_a_module_imports_upwards(tmp_path, module, line, contract):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml", "cli.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}  # an upward import\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    broken = [ln for ln in out.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), out.stdout


def test_importing_the_runtime_loads_nothing_of_the_learner_or_torch():
    code = ("import sys, runtime, runtime.server, runtime.heads, runtime.store_info, runtime.commands, "
            "runtime.serve_commands, runtime.tensorrt_build; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'cgil', 'export', 'cli', 'benchmarks', 'torch', "
            "'open_clip', 'torchvision'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
