"""The test suite itself: shared fixtures are built once per session, and the tiers are what they say.

An imported fixture is registered again in the importing module: a session fixture imported into six
modules was built six times (one train + export each). conftest.py holds every shared fixture instead.
"""
from __future__ import annotations

import ast
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SLOW_FIXTURES

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _fixtures_defined(tree: ast.Module) -> set[str]:
    """Names of the functions a module decorates with @pytest.fixture (with or without arguments)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    names.add(node.name)
    return names


def test_no_test_module_imports_a_fixture():
    trees = {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(TESTS.glob("*.py"))}
    fixtures = {stem: _fixtures_defined(tree) for stem, tree in trees.items()}
    imported = []
    for stem, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in fixtures:
                imported += [f"{stem}.py imports fixture {a.name} from {node.module}.py"
                             for a in node.names if a.name in fixtures[node.module]]
    assert not imported, "shared fixtures belong in conftest.py, used without an import:\n" + "\n".join(imported)


@pytest.mark.slow
def test_every_session_fixture_is_set_up_once():
    out = subprocess.run([sys.executable, "-m", "pytest", "--setup-plan", "-p", "no:xdist", "-p", "no:cacheprovider",
                          "-q", str(TESTS)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    setups = collections.Counter(re.findall(r"^\s*SETUP\s+S (\w+)", out.stdout, re.M))
    assert {"tiny_run", "fp32_bundle", "base_bundle"} <= set(setups)
    assert {name: n for name, n in setups.items() if n > 1} == {}


def _pytest_in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """This project's pytest settings (pyproject.toml) on a folder of made-up tests."""
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # hypothesis & co. only slow the start
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(folder),
                           "-p", "no:xdist", "-p", "no:cacheprovider", *args, str(folder)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_fast_tier_leaves_out_tests_needing_a_trained_bundle(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    # the fixture is overridden by a trivial one: the tier follows the name a test asks for
    (tmp_path / "test_tiers.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef fp32_bundle():\n    return 1\n\n"
        "def test_light():\n    pass\n\ndef test_heavy(fp32_bundle):\n    pass\n\n"
        "@pytest.mark.slow\ndef test_marked():\n    pass\n\n@pytest.mark.gpu\ndef test_cuda():\n    pass\n")
    out = _pytest_in(tmp_path, "--collect-only", "-m", "not slow and not gpu")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.findall(r"::(test_\w+)", out.stdout) == ["test_light"]
    assert {"fp32_bundle", "base_bundle", "tiny_run"} <= SLOW_FIXTURES


def test_a_misspelt_marker_is_an_error(tmp_path):
    (tmp_path / "test_typo.py").write_text("import pytest\n\n@pytest.mark.slwo\ndef test_x():\n    pass\n")
    out = _pytest_in(tmp_path)
    assert out.returncode != 0 and "'slwo' not found in `markers` configuration option" in out.stdout + out.stderr


def test_ci_lints_and_the_lint_finds_real_problems(tmp_path):
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make lint" in steps and "make test" in steps
    ruff = Path(sys.executable).with_name("ruff")
    assert subprocess.run([str(ruff), "check", "."], cwd=ROOT, capture_output=True, text=True).returncode == 0
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "bad.py").write_text("import os\n\n\ndef f(x=[]):\n    return undefined_name\n")
    out = subprocess.run([str(ruff), "check", "--output-format", "concise", "."], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1
    assert {"F401", "B006", "F821"} <= set(re.findall(r"\b([A-Z]\d{3})\b", out.stdout)), out.stdout


def test_the_version_has_one_source():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import cgil
    from cli import app
    from typer.testing import CliRunner

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cgil.__version__"}
    assert CliRunner().invoke(app, ["--version"]).output == f"cgil {cgil.__version__}\n"
    releases = re.findall(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == cgil.__version__
