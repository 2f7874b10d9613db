"""`cgil bench update --whole-run`: one whole CGIL run at the reference fixture's settings, its CPU time split
into generator fits, alignment and the fixed rest, against the fixture's reference CPU time.

The run goes through `cgil.train.run` in a fresh Python process, so the fixed part holds what a user's run
pays besides the two phases: imports, dataset, features (cached after the first run), zero-shot keys,
evaluation, replay-quality checks and the run files. PNG figures are not rendered: the reference writes
none, and `run(plots=False)` is how a caller asks for that. CPU times are process CPU seconds (user +
system) of the child, robust to other processes sharing the cores when the run has one thread.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from runtime.errors import CgilError


def reference_cpu_seconds(ref: dict[str, Any]) -> tuple[float, float]:
    """(low, high) reference CPU seconds of one whole run, read from the fixture's `cpu_seconds_note`
    ("... 176-205 s" or "... 180 s")."""
    note = str(ref.get("cpu_seconds_note", ""))
    span = re.search(r"(\d+(?:\.\d+)?)\s*[-\u2013]\s*(\d+(?:\.\d+)?)\s*s\b", note)
    if span:
        return float(span.group(1)), float(span.group(2))
    single = re.search(r"(\d+(?:\.\d+)?)\s*s\b", note)
    if single:
        return float(single.group(1)), float(single.group(1))
    raise CgilError(f"the fixture's cpu_seconds_note gives no CPU seconds: {note!r}")


def whole_run(reference: Path, order: Optional[int] = None, gen_seed: int = 0, threads: int = 1,
              quick: bool = False) -> dict[str, Any]:
    """Run one whole CGIL run in a child process and return its CPU split and the ratios to the reference."""
    from benchmarks.fidelity import load_reference

    ref = load_reference(reference)
    order = int(next(iter(ref["end_to_end"]))) if order is None else order
    args = [sys.executable, "-m", "benchmarks.update_run", str(reference), str(order), str(gen_seed), str(threads)]
    done = subprocess.run(args + (["--quick"] if quick else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise CgilError(f"the whole-run child failed: {done.stderr.strip().splitlines()[-1:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    low, high = reference_cpu_seconds(ref)
    total = child["total_cpu_s"]
    fixed = total - child["fit_cpu_s"] - child["align_cpu_s"]
    return {"order": order, "gen_seed": gen_seed, "threads": threads, "quick": quick,
            "final_avg_acc": child["final_avg_acc"], "total_cpu_s": total, "fit_cpu_s": child["fit_cpu_s"],
            "align_cpu_s": child["align_cpu_s"], "fixed_cpu_s": fixed,
            "imports_cpu_s": child["imports_cpu_s"], "reference_cpu_s_low": low, "reference_cpu_s_high": high,
            "cheaper_than_reference_x_low": low / total, "cheaper_than_reference_x_high": high / total}


def _child(argv: list[str]) -> None:
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    reference, order, gen_seed, threads = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    import torch

    torch.set_num_threads(threads)
    from benchmarks.fidelity import load_reference, train_config
    from cgil.progress import Reporter
    from cgil.train import run

    imports = cpu()
    cfg = train_config(load_reference(reference), order, gen_seed, quick="--quick" in argv)
    with tempfile.TemporaryDirectory(prefix="cgil-bench-whole-run-") as tmp:
        metrics = run(cfg, Path(tmp) / "run", reporter=Reporter(enabled=False), plots=False)
    print(json.dumps({"final_avg_acc": metrics["final_avg_acc"], "total_cpu_s": cpu(), "imports_cpu_s": imports,
                      "fit_cpu_s": metrics["cpu_timings"]["generators"],
                      "align_cpu_s": metrics["cpu_timings"]["alignment"]}))


if __name__ == "__main__":
    _child(sys.argv[1:])
