"""`cgil bench gpu`: check and time every GPU path this machine has, in one command (<= 8 min on one H100).

    cgil bench gpu                      # everything this machine can run; the rest says why not
    cgil bench gpu --dry-run            # no GPU work: runs every step's setup on the CPU, then lists the step skipped
    cgil bench gpu --device cpu --quick # the same steps at toy sizes on the CPU: checks the script itself

Part 1 needs only PyTorch with CUDA (plus small wheels: open_clip, typer, fastapi, ...):
  torch-latency  image graph of cgil-tiny and ViT-B-16 in fp32 and fp16 with CUDA graphs, batches 1/8/32,
                 p50/p99 from CUDA events around device-resident batches (targets: ViT-B-16 fp16
                 >= 6,000 images/s at batch 32, <= 3 ms at batch 1)
  update         a CUDA task update: 20 new classes, D = 512, VAE 500 passes, alignment 60 epochs on the
                 ViT-B-16 text tower; batched generators against a per-class loop, with both accuracies
                 (target: batched >= 10x faster, same accuracy)
  demo           the digits demo end to end: cgil train --device cuda, cgil export, cgil update --device cuda
  torchrun       feature extraction under torchrun, 2 processes (NCCL on 2 GPUs, else gloo): sharding,
                 gather, cache broadcast and barrier; embeddings equal to one process's
  resume         a CUDA run stopped after task 1 and resumed ends with the same metrics, bit for bit
Part 2 needs TensorRT 10 and/or onnxruntime-gpu (not on our borrowed GPU machines):
  tensorrt       fp16 and int8 engines of cgil-tiny and ViT-B-16 (static check, build, gates against ORT
                 CPU fp32: min cosine >= 0.999 for fp16, top-1 agreement >= 99%), timed next to ORT CUDA
Every step is a setup (CPU only: imports, models, inputs, references; --dry-run runs only these) and a
run. Results go to --out (default: $CGIL_CACHE/bench, outside the checkout; `make bench-tables` writes
benchmarks/results); a failing step is recorded and the next one runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .common import log, machine, markdown_table, write_results
from .gpu_update import UPDATE_SPEEDUP, run_update, setup_update

TARGETS = {"images_per_s_batch32": 6000.0, "p50_ms_batch1": 3.0, "update_speedup": UPDATE_SPEEDUP}
COLUMNS = ["part", "step", "item", "status", "p50_ms", "p99_ms", "images_per_s", "seconds", "speedup_x",
           "accuracy", "min_cosine", "top1_agreement", "target", "note"]


@dataclass
class Context:
    device: str
    quick: bool
    work: Path
    deadline: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    dry_run: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def index(self) -> int:  # the N of --device cuda:N (0 for plain cuda)
        return cuda_index(self.device)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def add(self, part: int, step: str, item: str, status: str, **values: Any) -> dict[str, Any]:
        row = {"part": part, "step": step, "item": item, "status": status, **values}
        self.rows.append(row)
        log(f"  [{step}] {item}: {status}" + (f" ({values['note']})" if values.get("note") else ""))
        return row


# ---------------------------------------------------------------- part 1: PyTorch on CUDA

def setup_torch_latency(ctx: Context) -> dict[str, Any]:
    """Models, device-free input batches, CPU fp32 references and zero-shot keys (for scores out)."""
    import torch

    from cgil.clip import create_clip, preprocess_config
    from export.onnx_export import ImageGraph

    from .latency import digits_pixels, zero_shot_keys

    batches = [1, 8] if ctx.quick else [1, 8, 32]
    cases = []
    for name in (["cgil-tiny"] if ctx.quick else ["cgil-tiny", "ViT-B-16"]):
        clip = create_clip(name, None, "cpu", 0)
        cfg = preprocess_config(clip)
        graph = ImageGraph(clip.model, cfg["mean"], cfg["std"]).eval()
        test, _ = digits_pixels(cfg, "test", 64)
        inputs = {b: np.ascontiguousarray(np.resize(test, (b, *test.shape[1:]))) for b in batches}
        with torch.no_grad():  # CPU fp32 once per batch: the numbers every GPU variant must match
            references = {b: graph(torch.from_numpy(x)).numpy() for b, x in inputs.items()}
        cases.append({"name": name, "graph": graph, "inputs": inputs, "references": references,
                      "keys": torch.from_numpy(zero_shot_keys(clip))})
    return {"cases": cases, "batches": batches, "summary": f"{len(cases)} model(s), CPU fp32 references for batches {batches}"}


def run_torch_latency(ctx: Context, state: dict[str, Any]) -> None:
    import torch

    from export.onnx_export import min_cosine

    from .latency_gpu import TorchCudaEmbedder

    repeats = 5 if ctx.quick else 50
    for case in state["cases"]:
        name, graph = case["name"], case["graph"]
        for dtype in ("fp32", "fp16"):
            if not ctx.cuda and dtype == "fp16":
                continue  # the CPU smoke run checks the timing code, not half precision on a CPU
            runner = TorchCudaEmbedder(graph, dtype, ctx.device) if ctx.cuda else None
            keys = case["keys"].to(ctx.device)
            for batch in state["batches"]:
                host = case["inputs"][batch]
                x = torch.from_numpy(host).to(ctx.device)
                call = (lambda: runner.on_device(x)) if runner else (lambda: graph(x))
                with torch.no_grad():
                    times = _timed_on_device(ctx, call, repeats)
                    cosine = min_cosine(call().float().cpu().numpy(), case["references"][batch])
                p50, p99 = float(np.median(times)), float(np.percentile(times, 99))
                mode = runner.mode if runner else "CPU eager"
                row = ctx.add(1, "torch-latency", f"{name} {dtype} batch {batch}", "ok", p50_ms=p50, p99_ms=p99,
                              images_per_s=batch / (p50 / 1e3), min_cosine=cosine,
                              note=mode + " (device-resident batch)" + (f"; {runner.notes[-1]}" if runner and runner.notes else ""))
                if name == "ViT-B-16" and dtype == "fp16" and batch in (1, 32):
                    target = (f">= {TARGETS['images_per_s_batch32']:.0f} images/s" if batch == 32
                              else f"<= {TARGETS['p50_ms_batch1']} ms")
                    met = row["images_per_s"] >= TARGETS["images_per_s_batch32"] if batch == 32 else p50 <= TARGETS["p50_ms_batch1"]
                    row.update(target=target, status="ok" if met else "below target")
                if not cosine >= (0.99 if dtype == "fp16" else 0.9999):
                    row["status"] = "failed"
                    row["note"] += f"; min cosine vs CPU fp32 {cosine:.5f}"
                _time_end_to_end(ctx, f"{name} {dtype} batch {batch}", host, runner.on_device if runner else graph,
                                 keys, repeats)


def _time_end_to_end(ctx: Context, item: str, host: np.ndarray, embed: Callable[[Any], Any], keys: Any,
                     repeats: int) -> None:
    """What a caller waits for: host uint8 pixels in, class scores back on the host (copies and sync included)."""
    import torch

    from .common import time_call

    def call():
        with torch.no_grad():
            return (embed(torch.from_numpy(host).to(ctx.device, non_blocking=False)) @ keys.t()).cpu().numpy()

    stats = time_call(call, warmup=3, repeats=repeats)
    ctx.add(1, "torch-latency", f"{item} end to end", "ok", p50_ms=stats["p50_ms"], p99_ms=stats["p99_ms"],
            images_per_s=len(host) / (stats["p50_ms"] / 1e3), note="host uint8 in, scores out (copies included)")


def _timed_on_device(ctx: Context, call: Callable[[], Any], repeats: int) -> list[float]:
    """Milliseconds per call: CUDA events around each call and a sync after it (GPU), else perf_counter."""
    import torch

    for _ in range(3):
        call()
    ctx.sync()
    times = []
    for _ in range(repeats):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


from .gpu_e2e import (resume_worker, run_demo, run_resume, run_torchrun, setup_demo, setup_resume,  # noqa: E402
                      setup_torchrun, torchrun_worker)
from .gpu_tensorrt import run_tensorrt, setup_tensorrt  # noqa: E402

Setup = Callable[[Context], dict[str, Any]]
Run = Callable[[Context, dict[str, Any]], None]
# name: (part, setup, run). A setup does CPU work only (imports, models, inputs, references, static
# checks) and is what --dry-run executes; the run is the GPU work.
STEPS: dict[str, tuple[int, Setup, Run]] = {
    "torch-latency": (1, setup_torch_latency, run_torch_latency), "update": (1, setup_update, run_update),
    "demo": (1, setup_demo, run_demo), "torchrun": (1, setup_torchrun, run_torchrun),
    "resume": (1, setup_resume, run_resume), "tensorrt": (2, setup_tensorrt, run_tensorrt),
}


def default_results_dir() -> Path:
    """Outside the checkout: a bench run must not dirty the repository unless asked (--out, make bench-tables)."""
    return Path(os.environ.get("CGIL_CACHE") or Path.home() / ".cache" / "cgil") / "bench"


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="cgil bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="No GPU work: run every step's CPU setup, list the step skipped")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run with --quick")
    p.add_argument("--quick", action="store_true", help="Toy sizes: check that every step runs, not how fast")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--budget-s", type=float, default=480.0, help="Steps not started within this many seconds are skipped")
    p.add_argument("--out", default=None, help="Results folder (default $CGIL_CACHE/bench; benchmarks/results only "
                                                "when given, as `make bench-tables` does)")
    p.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torchrun_worker:
        return torchrun_worker(args.device, Path(args.out)) or []
    if args.resume_worker:
        return resume_worker(args.device, Path(args.out), args.quick) or []
    no_gpu = _no_gpu_reason(args.device, args.dry_run)
    if not no_gpu and args.device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(args.device))  # --device cuda:N: default-device tensors, streams and events land on N
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cgil-gpu-") as tmp:
        ctx = Context(args.device, args.quick, Path(tmp), start + args.budget_s, dry_run=args.dry_run)
        for name in args.steps:
            part, setup, run = STEPS[name]
            if time.perf_counter() > ctx.deadline:
                ctx.add(part, name, "all", "skipped", note=f"skipped: the {args.budget_s:.0f} s budget was spent")
                continue
            log(f"{name}:")
            t0, stage = time.perf_counter(), "setup"
            try:
                state = setup(ctx)
                if no_gpu:
                    ctx.add(part, name, "all", "skipped", seconds=time.perf_counter() - t0,
                            note=f"skipped: {no_gpu}; setup ran: {state.get('summary', 'ok')}")
                    continue
                stage = "run"
                run(ctx, state)
            except Exception as e:  # record it and go on: one broken path must not hide the others
                ctx.add(part, name, "all", "failed", seconds=time.perf_counter() - t0,
                        note=f"{stage}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    rows = ctx.rows
    meta = {"command": "cgil bench gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": args.device, "quick": args.quick, "dry_run": args.dry_run, "targets": TARGETS,
            "seconds": round(time.perf_counter() - start, 1), "versions": _versions()}
    path = write_results("gpu", rows, meta, Path(args.out) if args.out else default_results_dir(), COLUMNS)
    print(f"\nmachine: {machine()}\n")
    print(markdown_table(rows, COLUMNS))
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        print("skipped:\n" + "\n".join(f"  {r['step']} ({r['item']}): {r['note']}" for r in skipped))
    print(f"results: {path}")
    return rows


def cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _no_gpu_reason(device: str, dry_run: bool) -> Optional[str]:
    if dry_run:
        return "no GPU (--dry-run)"
    if device == "cpu":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return "no GPU (torch.cuda.is_available() is False)"
        count = torch.cuda.device_count()
        return None if cuda_index(device) < count else f"no GPU {cuda_index(device)} ({count} visible)"
    except ImportError:
        return "no GPU (torch is not installed)"


def _versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for dist in ("torch", "open_clip_torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    main()
