"""Accuracy against CPU time for the training budget: generator passes and alignment epochs.

Decides the defaults of a `folder:` dataset (a user's own images, no preset): CGIL (VAE) on digits
with the tiny model, one budget changed at a time, CPU seconds of the generator fits and of the
alignment (time.process_time, so a shared machine does not skew them), final average accuracy over
the given seeds. Features are extracted once and cached for every row.

    python -m benchmarks.defaults --threads 1 [--seeds 1992 1996] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .common import add_out_option, add_threads_option, apply_threads, write_results

# (passes, epochs): a passes sweep at the digits preset's 20 epochs, an epochs sweep at 100 passes,
# and the paper's generic budget (500 passes, 60 epochs) that a folder got before.
GRID = [(10, 20), (25, 20), (50, 20), (100, 20), (200, 20), (100, 5), (100, 10), (100, 40), (500, 60)]
QUICK_GRID = [(5, 2), (10, 4)]


def measure(passes: int, epochs: int, seed: int, cache: Path) -> dict:
    from cgil.config import TrainConfig
    from cgil.progress import Reporter
    from cgil.train import run

    cfg = TrainConfig.for_dataset("digits", seed=seed, passes=passes, epochs=epochs)
    with tempfile.TemporaryDirectory() as out:
        start = time.process_time()
        metrics = run(cfg, Path(out) / "run", reporter=Reporter(enabled=False), cache_dir=cache)
        total = time.process_time() - start
    return {"passes": passes, "epochs": epochs, "seed": seed, "final_avg_acc": metrics["final_avg_acc"],
            "cpu_s_total": total, "wall_s_generators": metrics["timings"]["generators"],
            "wall_s_alignment": metrics["timings"]["alignment"]}


def save(rows: list[dict], args, argv) -> None:
    name = "defaults-digits" + ("-quick" if args.quick else "")
    command = "python -m benchmarks.defaults " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(name, rows, {"command": command, "threads": args.threads, "model": "cgil-tiny",
                               "generator": "vae", "dataset": "digits"},
                  columns=["passes", "epochs", "final_avg_acc", "final_avg_acc_per_seed", "cpu_s_per_run",
                           "wall_s_generators", "wall_s_alignment"], out_dir=args.out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1992, 1996])
    parser.add_argument("--quick", action="store_true", help="two tiny budgets, one seed (what the tests run)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="PASSESxEPOCHS",
                        help="budgets to measure, e.g. 100x20 500x60 (default: the whole grid)")
    add_threads_option(parser)
    add_out_option(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    grid, seeds = (QUICK_GRID, args.seeds[:1]) if args.quick else (GRID, args.seeds)
    if args.rows:
        grid = [tuple(int(v) for v in r.lower().split("x")) for r in args.rows]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        measure(1, 1, seeds[0], Path(cache))  # warm the feature cache: no row pays for extraction
        for passes, epochs in grid:
            runs = [measure(passes, epochs, s, Path(cache)) for s in seeds]
            row = {"passes": passes, "epochs": epochs, "seeds": seeds,
                   "final_avg_acc": statistics.mean(r["final_avg_acc"] for r in runs),
                   "final_avg_acc_per_seed": [round(r["final_avg_acc"], 2) for r in runs],
                   "cpu_s_per_run": statistics.mean(r["cpu_s_total"] for r in runs),
                   "wall_s_generators": statistics.mean(r["wall_s_generators"] for r in runs),
                   "wall_s_alignment": statistics.mean(r["wall_s_alignment"] for r in runs)}
            rows.append(row)
            save(rows, args, argv)  # after every row: a long sweep that is stopped keeps what it measured
            print(f"passes {passes:4d} epochs {epochs:3d}: acc {row['final_avg_acc']:.2f} "
                  f"{row['final_avg_acc_per_seed']}, {row['cpu_s_per_run']:.1f} CPU s per run", flush=True)


if __name__ == "__main__":
    main()
