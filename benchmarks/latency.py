"""Image-path latency: torch eager vs ONNX Runtime fp32 vs int8, side by side in one process.

    python -m benchmarks.latency                      # cgil-tiny, ViT-B-16, ViT-L-14; batch 1, 8, 32; this CPU
    python -m benchmarks.latency --models cgil-tiny --batches 1 8 32 --repeats 50
    python -m benchmarks.latency --skip ViT-L-14:32   # leave out a (model, batch) cell that takes too long

Every engine runs the same graph (uint8 NHWC pixels -> normalised embedding, export.onnx_export.ImageGraph)
on the same real inputs (digits test images at the model's size), engines taking turns call by call,
median (and p95/p99) of up to `--repeats` calls after warm-up; a cell whose round takes long gets
fewer calls (`--cell-seconds`, at least `--min-repeats`) and the table says how many. Random weights:
latency does not depend on the weights' values.

FLOPs are counted once per image with torch's FlopCounterMode on the unfused math path (MHA fast path
off, SDPA math backend): the fused inference kernels are invisible to the counter, which otherwise
misses the whole attention block (a third of ViT-B-16's 35.1 GFLOP). The FLOP-rate limit the rates
are compared with is measured on this machine (`gemm_peak`: best fp32 GEMM rate of torch and ONNX
Runtime at the run's threads), next to the nominal ISA peak (cores x clock x FLOP/cycle). Also reported: top-1
agreement of int8 with fp32 on the digits test split, with the zero-shot keys of the ten digit names
(or the head of `--run RUN` for that run's model).

Extending (issue 5): add an engine with `@engine("name")` (a factory returning `fn(pixels)`, or raising
latency_gpu.Unavailable where the engine cannot run, e.g. CUDA on a CPU machine); models and batches
are options. Each row records GFLOP/s and, for CPU engines, its share of the measured GEMM limit and
of the nominal peak. The GPU engines (torch CUDA fp32/fp16 with CUDA graphs, ORT CUDA fp32, TensorRT
fp16) live in benchmarks/latency_gpu.py; where they cannot run, rows say "not measured: <why>".
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

from .common import add_out_option, machine, markdown_table, write_results
from .latency_gpu import GPU_ENGINES, Unavailable
from .peaks import gemm_peak, nominal_peak

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
    gflop: float = 0.0

    def onnx(self, precision: str) -> Path:
        if precision not in self._paths:
            from export.onnx_export import export_image
            from export.quantize import to_fp16, to_int8

            fp32 = self._paths.get("fp32") or export_image(self.clip, self.preprocess, self.workdir / f"{self.name}.fp32.onnx")
            self._paths["fp32"] = fp32
            if precision == "int8":
                out = self.workdir / f"{self.name}.int8.onnx"
                t0 = time.perf_counter()
                # ORT's calibrator keeps every intermediate tensor of a batch: 16 ViT-L-14 images need > 24 GB.
                step = 16 if self.gflop < 50.0 else 2
                to_int8(fp32, out, [self.calibration[i:i + step] for i in range(0, len(self.calibration), step)])
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
for _name, _factory in GPU_ENGINES.items():  # torch CUDA, ORT CUDA, TensorRT: benchmarks/latency_gpu.py
    engine(_name)(_factory)


def _percentile(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(p / 100.0 * (len(sorted_ms) - 1)))]


def time_interleaved(fns: dict[str, Embed], pixels: np.ndarray, warmup: int, repeats: int,
                     cell_seconds: float = float("inf"), min_repeats: int = 3) -> dict[str, dict]:
    """Per-engine wall times, engines taking turns call by call.

    Round-robin rather than one engine after the other: load from other processes on a shared
    machine then slows every engine alike instead of whichever ran during the busy minute.
    Warm-up rounds are not timed. After the first timed round, the number of rounds is cut to what
    fits in `cell_seconds` (never below `min_repeats`): ViT-L-14 at batch 32 takes a minute a round
    on two cores. Statistics as common.time_call (median, p95, p99 in ms).
    """
    times: dict[str, list[float]] = {e: [] for e in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn(pixels)
    rounds, i, started = repeats, 0, time.perf_counter()
    while i < rounds:
        for e, fn in fns.items():
            t0 = time.perf_counter()
            fn(pixels)
            times[e].append((time.perf_counter() - t0) * 1000.0)
        if i == 0:
            per_round = time.perf_counter() - started
            rounds = max(min_repeats, min(repeats, int(cell_seconds / max(per_round, 1e-9))))
        i += 1
    out = {}
    for e, ts in times.items():
        ts.sort()
        out[e] = {"p50_ms": float(np.median(ts)), "p95_ms": _percentile(ts, 95), "p99_ms": _percentile(ts, 99),
                  "runs": len(ts)}
    return out


def flops_per_image(graph, image_hw: tuple[int, int]) -> float:
    """FLOPs (2 per multiply-add) of one image through `graph`, attention included.

    Counted on the unfused math path: torch's MHA inference fast path and its fused SDPA kernels are
    not seen by FlopCounterMode, which then undercounts ViT-B-16 by 36% (22.5 instead of 35.1 GFLOP).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from export.onnx_export import _no_mha_fastpath

    x = torch.zeros(1, *image_hw, 3, dtype=torch.uint8)
    with _no_mha_fastpath(), sdpa_kernel(SDPBackend.MATH), torch.inference_mode(), \
            FlopCounterMode(display=False) as counter:
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
    from cgil.tensor_io import load_tensors
    from cgil.runs import open_run

    config, state = open_run(Path(run_dir))
    if config["settings"]["model"] != model:
        return None
    return load_tensors(state / "head.safetensors")["keys"].float().numpy()


def bench_model(name: str, batches: list[int], engines: list[str], repeats: int, threads: int, workdir: Path,
                calibration_images: int, run_dir: Optional[str], big_agreement_images: int = 200, *,
                peak: Optional[dict] = None, nominal: Optional[dict] = None, cell_seconds: float = float("inf"),
                min_repeats: int = 3, skip: frozenset = frozenset(),
                large_images: Optional[int] = None) -> list[dict[str, Any]]:
    import torch

    from cgil.clip import create_clip, preprocess_config
    from export.onnx_export import ImageGraph
    from export.quantize import top1_agreement

    torch.set_num_threads(threads)
    clip = create_clip(name, None, "cpu", 0)
    cfg = preprocess_config(clip)
    graph = ImageGraph(clip.model, cfg["mean"], cfg["std"]).eval()
    gflop = flops_per_image(graph, tuple(cfg["size"])) / 1e9
    if gflop > 50.0 and large_images:  # ViT-L-14: about a second per image on 2 cores
        calibration_images, big_agreement_images = min(calibration_images, large_images), min(big_agreement_images, large_images)
    test, _ = digits_pixels(cfg, "test")
    calibration, _ = digits_pixels(cfg, "train", calibration_images)
    case = ModelCase(name, clip, graph, cfg, workdir, calibration, threads, {}, gflop)
    fns, rows = {}, []
    for e in engines:
        try:
            fn = ENGINES[e](case)
        except Unavailable as why:  # a GPU engine on a machine without it: a row that says why, never an estimate
            rows += [{"model": name, "batch": b, "engine": e, "note": f"not measured: {why}"} for b in batches]
            print(f"  {name} {e}: not measured ({why})", flush=True)
            continue
        if fn is not None:
            fns[e] = fn
    for batch in batches:
        if (name, batch) in skip:
            print(f"  {name} batch {batch}: skipped (--skip)", flush=True)
            rows += [{"model": name, "batch": batch, "engine": e, "note": "skipped (too slow for this run)"} for e in fns]
            continue
        pixels = np.ascontiguousarray(np.resize(test, (batch, *test.shape[1:])))
        warmup = 3 if gflop * batch < 100 else 1  # ViT-L-14 batch 8 (1.2 TFLOP a call): one untimed round
        timings = time_interleaved(fns, pixels, warmup=warmup, repeats=repeats, cell_seconds=cell_seconds,
                                   min_repeats=min_repeats)
        base = timings.get("torch eager", next(iter(timings.values())))["p50_ms"]
        for e, stats in timings.items():
            rate = gflop * batch / (stats["p50_ms"] / 1e3)
            rows.append({"model": name, "batch": batch, "engine": e, "p50_ms": stats["p50_ms"], "p95_ms": stats["p95_ms"],
                         "p99_ms": stats["p99_ms"], "ms_per_image": stats["p50_ms"] / batch,
                         "images_per_s": batch / (stats["p50_ms"] / 1e3), "speedup_vs_torch": base / stats["p50_ms"],
                         "gflop_per_s": rate,
                         # the CPU limits say nothing about a GPU engine's rate
                         "pct_of_gemm_peak": 100.0 * rate / peak["gflop_per_s"] if peak and e not in GPU_ENGINES else None,
                         "pct_of_nominal_peak": (100.0 * rate / nominal["gflop_per_s"]
                                                 if nominal and e not in GPU_ENGINES else None),
                         "runs": stats["runs"], "warmup": warmup, "load_1min_after": round(os.getloadavg()[0], 2)})
            print(f"  {name} batch {batch} {e}: {stats['p50_ms']:.2f} ms ({stats['runs']} runs)", flush=True)
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
                     "agreement_images": len(test), "agreement_keys": keys_from,
                     "calibration_images": len(calibration)}
    for r in rows:
        if r["model"] == name:
            r.update({"gflop_per_image": gflop, **(agreement if "p50_ms" in r else {})})
    return rows


def _skip_cells(specs: list[str]) -> frozenset:
    cells = set()
    for spec in specs:
        model, _, batch = spec.rpartition(":")
        cells.add((model, int(batch)))
    return frozenset(cells)


def _notes(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    peak, nominal = meta["gemm_peak"], meta["nominal_peak"]
    rates = ", ".join(f"{k}: {v:.1f}" for k, v in peak["rates"].items())
    lines = ["", "## FLOP-rate limit", "",
             f"- **Measured (the limit used for 'share of peak', column pct_of_gemm_peak)**: {peak['gflop_per_s']:.1f} "
             f"GFLOP/s at {peak['threads']} thread(s), {peak['basis']}; best was {peak['best']}. All: {rates} GFLOP/s.",
             f"- Nominal ISA peak (column pct_of_nominal_peak): {nominal.get('gflop_per_s', float('nan')):.1f} GFLOP/s = "
             f"{nominal.get('basis', 'unknown')}. The VM reports its nominal clock; cores boost above it, so measured "
             "GEMM rates can exceed this figure "
             f"(the measured rate implies at least {peak['gflop_per_s'] / max(1, nominal.get('threads', 1)) / nominal.get('flop_per_cycle', 32):.2f} GHz "
             "sustained). int8 rows count the same FLOPs: their share of the fp32 limit can pass 100%.",
             "- FLOPs per image from torch FlopCounterMode on the unfused math path (attention included).",
             "", "## Conditions", "",
             f"- Threads: {meta['threads']} (torch.set_num_threads and ORT intra_op_num_threads; ORT threads do not spin).",
             f"- Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in meta['load_average_at_start'])}, "
             f"at end {tuple(round(x, 2) for x in meta['load_average_at_end'])}.",
             f"- Up to {meta['repeats']} timed rounds per cell after warm-up (3 rounds, 1 for cells above 100 GFLOP a call), "
             f"cut to what fits in {meta['cell_seconds']} s per cell and never below {meta['min_repeats']}: column runs.",
             f"- 1-minute load average after each cell (JSON load_1min_after; this benchmark's own threads count, so "
             f"about {meta['threads']} when alone): max "
             f"{max((r['load_1min_after'] for r in rows if 'load_1min_after' in r), default=float('nan'))}.",
             f"- Skipped cells: {meta['skip'] or 'none'}. GPU engines ({', '.join(GPU_ENGINES)}): rows marked "
             "'not measured' say why where a GPU, onnxruntime-gpu or TensorRT is missing.",
             f"- Total time {meta['seconds']} s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cgil-tiny", "ViT-B-16", "ViT-L-14"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--repeats", type=int, default=20, help="Timed rounds per cell at most")
    p.add_argument("--min-repeats", type=int, default=3, help="Timed rounds per cell at least")
    p.add_argument("--cell-seconds", type=float, default=60.0, help="Time budget of a cell's timed rounds")
    p.add_argument("--skip", nargs="*", default=[], metavar="MODEL:BATCH", help="Cells to leave out, e.g. ViT-L-14:32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--calibration-images", type=int, default=256, help="int8 calibration images (digits train)")
    p.add_argument("--large-images", type=int, default=64,
                   help="int8 calibration and agreement images for models above 50 GFLOP/image (ViT-L-14)")
    p.add_argument("--big-agreement-images", type=int, default=200,
                   help="Test images for the int8 agreement of models above 1 GFLOP/image (the tiny model uses all)")
    p.add_argument("--run", default=None, help="Use this run's head for the agreement of its model")
    add_out_option(p)
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    start, load_start = time.perf_counter(), os.getloadavg()  # other processes on a shared machine skew timings
    peak, nominal = gemm_peak(args.threads), nominal_peak(args.threads)
    print(f"fp32 GEMM limit {peak['gflop_per_s']:.1f} GFLOP/s ({peak['best']}); nominal {nominal.get('gflop_per_s')}",
          flush=True)
    skip = _skip_cells(args.skip)
    with tempfile.TemporaryDirectory(prefix="cgil-latency-") as tmp:
        for model in args.models:
            print(f"{model}:", flush=True)
            rows += bench_model(model, args.batches, args.engines, args.repeats, args.threads, Path(tmp),
                                args.calibration_images, args.run, args.big_agreement_images, peak=peak, nominal=nominal,
                                cell_seconds=args.cell_seconds, min_repeats=args.min_repeats, skip=skip,
                                large_images=args.large_images)
    columns = ["model", "batch", "engine", "p50_ms", "p95_ms", "p99_ms", "ms_per_image", "images_per_s",
               "speedup_vs_torch", "gflop_per_s", "pct_of_gemm_peak", "pct_of_nominal_peak", "runs",
               "int8_top1_agreement_vs_fp32", "note"]
    meta = {"command": "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads, "repeats": args.repeats, "min_repeats": args.min_repeats,
            "cell_seconds": args.cell_seconds, "skip": [f"{m}:{b}" for m, b in sorted(skip)],
            "weights": "random (seed 0)", "inputs": "digits test images resized to the model's size",
            "gemm_peak": peak, "nominal_peak": nominal, "seconds": round(time.perf_counter() - start, 1),
            "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    path = write_results("latency", rows, meta, args.out_dir, columns)
    md = path.with_suffix(".md")
    md.write_text(md.read_text() + _notes(meta, rows))
    print(f"\nmachine: {machine()}\n")
    print(markdown_table(rows, columns) + _notes(meta, rows))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
