"""`cgil bench NAME [ARGS]`: run a benchmark script from the cgil CLI.

Each script under benchmarks/ exposes `main(argv)` and parses its own options, so
`cgil bench update --quick` is the same as `python -m benchmarks.update --quick`
(`cgil bench NAME --help` lists a script's options).
"""
from __future__ import annotations

import importlib
import importlib.util

import typer

from runtime.console import guarded

BENCHMARKS = {
    "latency": "image-path latency: torch eager vs ONNX Runtime fp32 vs int8, GFLOP/s",
    "update": "cost of one task update as seen classes grow (generators, alignment, text path)",
    "accuracy": "CGIL per generator vs zero-shot, joint and sequential; heatmaps and curves",
    "store": "replay-store bytes per class (fp32/fp16/int8) vs raw features/images, with accuracy",
    "alignment": "alignment epoch cost and accuracy as seen classes grow: all-class softmax vs sampled negatives",
    "fidelity": "cgil vs the reference implementation on identical inputs: replay variance/FD per class, accuracy",
    "serve": "HTTP serving latency before/during hot swaps, on-device update phases, store bytes, fp16 store effect",
    "gpu": "every GPU path this machine has, checked and timed (torch CUDA, CUDA update, demo, torchrun, TensorRT)",
}
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def available() -> list[str]:
    return [name for name in BENCHMARKS if importlib.util.find_spec(f"benchmarks.{name}") is not None]


def run_benchmark(name: str, argv: list[str]) -> None:
    def bench(argv: list[str]) -> None:  # the import too is guarded: on a torch-free device it names the extra
        return importlib.import_module(f"benchmarks.{name}").main(argv)

    guarded(bench)(list(argv))


def _command(name: str):
    def command(ctx: typer.Context) -> None:
        run_benchmark(name, list(ctx.args))

    command.__doc__ = BENCHMARKS[name].capitalize() + f". Options: cgil bench {name} --help"
    return command


def register(app: typer.Typer) -> None:
    bench = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Benchmarks: each prints a table and writes JSON + markdown outside the checkout "
                             "(~/.cache/cgil/bench, or --out DIR); make bench-tables publishes chosen results.")
    for name in available():
        bench.command(name, context_settings=_PASS_THROUGH, help=BENCHMARKS[name])(_command(name))
    app.add_typer(bench, name="bench")
