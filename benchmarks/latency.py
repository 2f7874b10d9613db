"""Image-path latency: torch eager vs ONNX Runtime fp32 vs int8, side by side in one process.

    python -m benchmarks.latency                      # cgil-tiny and ViT-B-16, batch 1 and 8, this CPU
    python -m benchmarks.latency --models cgil-tiny --batches 1 8 32 --repeats 50

Every engine runs the same graph (uint8 NHWC pixels -> normalised embedding, export.onnx_export.ImageGraph)
on the same real inputs (digits test images at the model's size), median of `--repeats` calls after
warm-up. Random weights: latency does not depend on the weights' values. Also reported: top-1
agreement of int8 with fp32 on the digits test split, with the zero-shot keys of the ten digit names
(or the head of `--run RUN` for that run's model).

Extending (issue 5): add an engine with `@engine("name")` (a factory returning `fn(pixels)`, or None
where the engine is unavailable, e.g. CUDA on a CPU machine); models and batches are options. Each row
records GFLOP/s from FlopCounterMode's count of one image, so a share-of-peak column is one division.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .common import machine, markdown_table, write_results

Embed = Callable[[np.ndarray], np.ndarray]
ENGINES: dict[str, Callable[["ModelCase"], Optional[Embed]]] = {}


def engine(name: str):
    def register(factory):
        ENGINES[name] = factory
        return factory

    return register


@dataclass
class ModelCase:
    """One model, exported once; engines are built from it."""

    name: str
    clip: Any
    graph: Any  # export.onnx_export.ImageGraph (torch)
    preprocess: dict
    workdir: Path
    calibration: np.ndarray
    threads: int
    _paths: dict

    def onnx(self, precision: str) -> Path:
        if precision not in self._paths:
            from export.onnx_export import export_image
            from export.quantize import to_fp16, to_int8

            fp32 = self._paths.get("fp32") or export_image(self.clip, self.preprocess, self.workdir / f"{self.name}.fp32.onnx")
            self._paths["fp32"] = fp32
            if precision == "int8":
                out = self.workdir / f"{self.name}.int8.onnx"
                t0 = time.perf_counter()
                to_int8(fp32, out, [self.calibration[i:i + 16] for i in range(0, len(self.calibration), 16)])
                print(f"  {self.name}: int8 calibration on {len(self.calibration)} images took {time.perf_counter() - t0:.0f}s",
                      flush=True)
                self._paths["int8"] = out
            elif precision == "fp16":
                self._paths["fp16"] = to_fp16(fp32, self.workdir / f"{self.name}.fp16.onnx")
        return self._paths[precision]


@engine("torch eager")
def _torch_eager(case: ModelCase) -> Embed:
    import torch

    torch.set_num_threads(case.threads)

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return case.graph(torch.from_numpy(pixels)).numpy()

    return run


def _ort(precision: str):
    def factory(case: ModelCase) -> Embed:
        from runtime.backends import OnnxRuntimeImage

        # No spinning: ORT's idle threads would otherwise busy-wait while torch runs its turn.
        return OnnxRuntimeImage(case.onnx(precision), ["CPUExecutionProvider"], precision, threads=case.threads,
                                spinning=False).embed

    return factory


engine("ORT fp32")(_ort("fp32"))
engine("ORT int8")(_ort("int8"))


def time_interleaved(fns: dict[str, Embed], pixels: np.ndarray, warmup: int, repeats: int) -> dict[str, dict]:
    """Per-engine wall times, engines taking turns call by call.

    Round-robin rather than one engine after the other: load from other processes on a shared
    machine then slows every engine alike instead of whichever ran during the busy minute.
    Same statistics as common.time_call (median, p95 in ms).
    """
    times: dict[str, list[float]] = {e: [] for e in fns}
    for i in range(warmup + repeats):
        for e, fn in fns.items():
            t0 = time.perf_counter()
            fn(pixels)
            if i >= warmup:
                times[e].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for e, ts in times.items():
        ts.sort()
        out[e] = {"p50_ms": float(np.median(ts)), "p95_ms": ts[min(len(ts) - 1, round(0.95 * (len(ts) - 1)))], "runs": len(ts)}
    return out


def flops_per_image(graph, image_hw: tuple[int, int]) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *image_hw, 3, dtype=torch.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        graph(x)
    return float(counter.get_total_flops())


def digits_pixels(preprocess_cfg: dict, split: str, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    from cgil.data import get_dataset, load_image
    from runtime.preprocess import Preprocess

    ds = get_dataset("digits")
    part = ds.test if split == "test" else ds.train
    step = 1 if limit is None else max(1, -(-len(part) // limit))
    pre = Preprocess.from_config(preprocess_cfg)
    return pre.batch([load_image(x) for x in part.items[::step]]), part.labels[::step]


def zero_shot_keys(clip) -> np.ndarray:
    import torch

    from cgil.data.digits import DIGIT_NAMES
    from cgil.text import TextEncoder, normalize

    with torch.no_grad():
        return normalize(TextEncoder(clip.model, clip.tokenizer).zero_shot(DIGIT_NAMES)).numpy()


def run_keys(run_dir: Optional[str], model: str) -> Optional[np.ndarray]:
    if not run_dir:
        return None
    from cgil.artifacts import load_tensors, read_json
    from cgil.runs import open_run

    config, state = open_run(Path(run_dir))
    if config["settings"]["model"] != model:
        return None
    return load_tensors(state / "head.safetensors")["keys"].float().numpy()


def bench_model(name: str, batches: list[int], engines: list[str], repeats: int, threads: int, workdir: Path,
                calibration_images: int, run_dir: Optional[str], big_agreement_images: int = 200) -> list[dict[str, Any]]:
    import torch

    from cgil.clip import create_clip
    from export.onnx_export import ImageGraph, model_preprocess
    from export.quantize import top1_agreement

    torch.set_num_threads(threads)
    clip = create_clip(name, None, "cpu", 0)
    cfg = model_preprocess(clip)
    graph = ImageGraph(clip.model, cfg["mean"], cfg["std"]).eval()
    test, _ = digits_pixels(cfg, "test")
    calibration, _ = digits_pixels(cfg, "train", calibration_images)
    case = ModelCase(name, clip, graph, cfg, workdir, calibration, threads, {})
    gflop = flops_per_image(graph, tuple(cfg["size"])) / 1e9
    fns = {e: fn for e in engines if (fn := ENGINES[e](case)) is not None}
    rows = []
    for batch in batches:
        pixels = np.ascontiguousarray(np.resize(test, (batch, *test.shape[1:])))
        timings = time_interleaved(fns, pixels, warmup=3, repeats=repeats)
        base = None
        for e, stats in timings.items():
            base = base or stats["p50_ms"]
            rows.append({"model": name, "batch": batch, "engine": e, "p50_ms": stats["p50_ms"], "p95_ms": stats["p95_ms"],
                         "ms_per_image": stats["p50_ms"] / batch, "speedup_vs_torch": base / stats["p50_ms"],
                         "gflop_per_s": gflop * batch / (stats["p50_ms"] / 1e3), "runs": stats["runs"]})
            print(f"  {name} batch {batch} {e}: {stats['p50_ms']:.2f} ms", flush=True)
    # accuracy side of the trade: does int8 pick the same class as fp32 on the digits test split?
    keys = run_keys(run_dir, name)
    keys_from = "run head" if keys is not None else "zero-shot digit names"
    keys = zero_shot_keys(clip) if keys is None else keys
    agreement = {}
    if gflop > 1.0 and len(test) > big_agreement_images:  # seconds per image on a CPU: a subset, every k-th image
        test = test[:: -(-len(test) // big_agreement_images)]
    if "ORT fp32" in fns and "ORT int8" in fns:
        chunks = lambda fn: np.concatenate([fn(test[i:i + 32]) for i in range(0, len(test), 32)])  # noqa: E731
        agreement = {"int8_top1_agreement_vs_fp32": top1_agreement(chunks(fns["ORT fp32"]), chunks(fns["ORT int8"]), keys),
                     "agreement_images": len(test), "agreement_keys": keys_from}
    for r in rows:
        if r["model"] == name:
            r.update({"gflop_per_image": gflop, **agreement})
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cgil-tiny", "ViT-B-16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--calibration-images", type=int, default=256, help="int8 calibration images (digits train)")
    p.add_argument("--big-agreement-images", type=int, default=200,
                   help="Test images for the int8 agreement of models above 1 GFLOP/image (the tiny model uses all)")
    p.add_argument("--run", default=None, help="Use this run's head for the agreement of its model")
    p.add_argument("--out", default=None, help="Results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    start, load_start = time.perf_counter(), os.getloadavg()  # other processes on a shared machine skew timings
    with tempfile.TemporaryDirectory(prefix="cgil-latency-") as tmp:
        for model in args.models:
            print(f"{model}:", flush=True)
            rows += bench_model(model, args.batches, args.engines, args.repeats, args.threads, Path(tmp),
                                args.calibration_images, args.run, args.big_agreement_images)
    columns = ["model", "batch", "engine", "p50_ms", "p95_ms", "ms_per_image", "speedup_vs_torch", "gflop_per_s",
               "int8_top1_agreement_vs_fp32"]
    meta = {"command": "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads, "repeats": args.repeats, "weights": "random (seed 0)",
            "inputs": "digits test images resized to the model's size", "seconds": round(time.perf_counter() - start, 1),
            "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    path = write_results("latency", rows, meta, Path(args.out) if args.out else None, columns)
    print(f"\nmachine: {machine()}\n")
    print(markdown_table(rows, columns))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
