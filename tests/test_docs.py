"""The front-door README links only to pages that exist, and benchmarks/README.md is generated from results/."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_links_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_benchmark_tables_are_the_results_files():
    from benchmarks.readme import README, main

    assert main(["--check"]) == 0, "benchmarks/README.md is out of date: run python -m benchmarks.readme"
    assert "[results/update-amd-epyc-2c.md]" in README.read_text()


def test_a_changed_results_file_makes_the_check_fail(tmp_path):
    from benchmarks.readme import README, render

    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results, ignore=shutil.ignore_patterns("*.png", "*.json"))
    current = README.read_text()
    assert render(current, results) == current
    (results / "store-amd-epyc-2c.md").write_text("# store\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert render(current, results) != current
