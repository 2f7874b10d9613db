"""Part 1 of `cgil bench gpu`, end to end in fresh processes: the digits demo, torchrun with NCCL, resume.

Fresh processes because CUBLAS_WORKSPACE_CONFIG (deterministic cuBLAS, for resume) is read only
before CUDA starts, and torchrun must own the process it starts.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A cgil command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1][:300] if lines else f"exit {proc.returncode}"


def _digit_folders(root: Path, per_class: int) -> Path:
    """Two new classes of real images (digits 0 and 1 of the train split) as an update would receive them."""
    from PIL import Image

    from cgil.data import get_dataset, load_image

    train = get_dataset("digits").train
    for label, name in ((0, "new_zero"), (1, "new_one")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        items = [it for it, l in zip(train.items, train.labels) if int(l) == label][:per_class]
        for i, item in enumerate(items):
            Image.fromarray(np.asarray(load_image(item))).save(folder / f"{i}.png")
    return root


def step_demo(ctx) -> None:
    run, bundle = ctx.work / "demo-run", ctx.work / "demo-bundle"
    budget = ["--tasks", "2", "--epochs", "1", "--passes", "2"] if ctx.quick else []
    commands = [
        ("train", ["train", "--dataset", "digits", "--device", ctx.device, "--out", str(run), "--quiet", *budget]),
        ("export", ["export", str(run), "--out", str(bundle), "--force"]),
        ("update", ["update", str(bundle), "--data", str(_digit_folders(ctx.work / "demo-new", 8)), "--device",
                    ctx.device, "--json", *(["--epochs", "1", "--passes", "2"] if ctx.quick else [])]),
    ]
    for name, args in commands:
        t0 = time.perf_counter()
        proc = _cli(*args)
        ok = proc.returncode == 0
        ctx.add(1, "demo", f"cgil {name}" + (f" --device {ctx.device}" if name != "export" else ""),
                "ok" if ok else "failed", seconds=time.perf_counter() - t0, note="" if ok else _tail(proc))
        if not ok:
            return


def step_torchrun(ctx) -> None:
    out = ctx.work / "torchrun.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "benchmarks.gpu", "--torchrun-worker", "--device", ctx.device, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        ctx.add(1, "torchrun", "feature extraction, 1 process", "failed", note=_tail(proc))
        return
    r = json.loads(out.read_text())
    ctx.add(1, "torchrun", f"feature extraction, 1 process, {r['backend']}", "ok" if r["equal"] else "failed",
            seconds=time.perf_counter() - t0, note=f"{r['images']} images; all_gather equal to one process: {r['equal']}")


def torchrun_worker(device: str, out: Path) -> None:
    """Run by step_torchrun under torchrun: join the group (NCCL on CUDA), embed, all_gather, compare."""
    import torch
    import torch.distributed as dist

    from cgil.clip import create_clip
    from cgil.data import get_dataset
    from cgil.distributed import local_rank, local_world_size, rank_gpu
    from cgil.features import embed_items

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank_gpu(device, local_rank(), local_world_size(), torch.cuda.device_count()))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend)
    clip = create_clip("cgil-tiny", None, "cuda" if cuda else "cpu", 0)
    items = get_dataset("digits").test.items[:256]
    feats = embed_items(clip, items, 64).to(clip.device)
    gathered = [torch.empty_like(feats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, feats)
    equal = bool(torch.equal(torch.cat(gathered).cpu(), embed_items(clip, items, 64, workers=0)))
    dist.destroy_process_group()
    out.write_text(json.dumps({"backend": backend, "equal": equal, "images": len(items)}))


def step_resume(ctx) -> None:
    """Bit-for-bit resume on this device: the README claims it on the CPU; this checks CUDA."""
    out = ctx.work / "resume.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--resume-worker", "--device", ctx.device,
                           "--out", str(out)] + (["--quick"] if ctx.quick else []),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        ctx.add(1, "resume", "stop after task 1, resume", "failed", note=_tail(proc))
        return
    r = json.loads(out.read_text())
    equal = r["equal"] and not r["differing_tensors"]
    ctx.add(1, "resume", "stop after task 1, resume", "ok" if equal else "failed", seconds=time.perf_counter() - t0,
            note=f"accuracy matrices equal: {r['equal']}; state tensors (head, generators, prompts) equal byte for "
                 f"byte: {not r['differing_tensors']}" + (f" (differ: {', '.join(r['differing_tensors'][:5])})"
                                                            if r["differing_tensors"] else ""))


def resume_worker(device: str, out: Path, quick: bool) -> None:
    from cgil.config import TrainConfig
    from cgil.progress import Reporter
    from cgil.train import run

    def cfg():
        c = TrainConfig.for_dataset("digits", tasks=2, device=device, epochs=2 if quick else 8)
        c.generator.passes = 2 if quick else 20
        return c

    work = out.parent / "resume-runs"
    quiet = Reporter(enabled=False)
    full = run(cfg(), work / "full", reporter=quiet, cache_dir=work / "cache")
    run(cfg(), work / "part", stop_after=0, reporter=quiet, cache_dir=work / "cache")
    resumed = run(cfg(), work / "part", resume=True, reporter=quiet, cache_dir=work / "cache")
    out.write_text(json.dumps({"equal": full["accuracy_matrix"] == resumed["accuracy_matrix"],
                               "differing_tensors": differing_state_tensors(work / "full", work / "part")}))


def differing_state_tensors(run_a: Path, run_b: Path) -> list[str]:
    """Names of the final-state tensors (every .safetensors of the current state: head, generators,
    prompts) whose dtype, shape or bytes differ between two runs; empty when they are identical."""
    from cgil.runs import open_run
    from cgil.tensor_io import load_tensors

    def tensors(run_dir: Path) -> dict:
        _, state = open_run(run_dir)
        return {f"{f.name}:{k}": v for f in sorted(state.glob("*.safetensors")) for k, v in load_tensors(f).items()}

    a, b = tensors(run_a), tensors(run_b)
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if _bytes(a[k]) != _bytes(b[k])]


def _bytes(t) -> tuple:
    """dtype, shape and raw bytes of a tensor (bf16 included: numpy has no bfloat16, bytes do)."""
    import torch

    return str(t.dtype), tuple(t.shape), t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
