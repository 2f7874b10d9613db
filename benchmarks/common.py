"""Shared benchmark plumbing: machine naming, robust timing, and results as JSON + markdown."""
from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

# The published tables, in the checkout: written only by `make bench-tables` (benchmarks/readme.py --publish),
# never by a benchmark run, so that running one in a clone leaves the clone as it was.
RESULTS_DIR = Path(__file__).parent / "results"


def default_out_dir() -> Path:
    """Where a benchmark writes unless given --out: outside the checkout, under the cache root
    ($CGIL_CACHE/bench, else ~/.cache/cgil/bench)."""
    from runtime.artifacts import cache_root

    return cache_root("bench")


def add_out_option(parser) -> None:
    """--out DIR (--out-dir is the older spelling) for every benchmark; args.out_dir, None: default_out_dir()."""
    parser.add_argument("--out", "--out-dir", dest="out_dir", type=Path, default=None,
                        help="results folder (default: $CGIL_CACHE/bench or ~/.cache/cgil/bench, outside the checkout; "
                             "make bench-tables publishes chosen results to benchmarks/results)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> Optional[str]:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def machine() -> dict[str, Any]:
    import os

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(), "python": platform.python_version()}


def machine_slug() -> str:
    m = machine()
    name = m["gpu"] or m["cpu"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] + f"-{m['cores']}c"


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")


def apply_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def log(message: str) -> None:
    """Progress of a benchmark goes to stderr; its table goes to stdout."""
    import sys

    print(message, file=sys.stderr, flush=True)


def time_call(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0) -> dict[str, float]:
    """Per-call wall times after warm-up: median and tail percentiles in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()

    def pct(p: float) -> float:
        return times[min(len(times) - 1, int(round(p / 100.0 * (len(times) - 1))))]

    return {"p50_ms": statistics.median(times), "p95_ms": pct(95), "p99_ms": pct(99), "runs": len(times)}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any],
                  out_dir: Optional[Path] = None, columns: Optional[Sequence[str]] = None) -> Path:
    """OUT/<name>-<machine>.json and .md (OUT: out_dir, else default_out_dir()); returns the JSON path."""
    out_dir = Path(out_dir) if out_dir else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{machine_slug()}"
    doc = {"benchmark": name, "machine": machine(), "meta": meta, "rows": list(rows),
           "date": time.strftime("%Y-%m-%d")}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = f"# {name}\n\nMachine: {doc['machine']}\n\nCommand: `{meta.get('command', '')}`\n\n" + markdown_table(rows, columns)
    (out_dir / f"{stem}.md").write_text(md)
    return out_dir / f"{stem}.json"
