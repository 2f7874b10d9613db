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


def setup_demo(ctx) -> dict:
    """The CLI starts (in a fresh process, as the commands will), two folders of new-class images, the three commands."""
    proc = _cli("--help", timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`python -m cli --help` failed: {_tail(proc)}")
    run, bundle = ctx.work / "demo-run", ctx.work / "demo-bundle"
    budget = ["--tasks", "2", "--epochs", "1", "--passes", "2"] if ctx.quick else []
    commands = [
        ("train", ["train", "--dataset", "digits", "--device", ctx.device, "--out", str(run), "--quiet", *budget]),
        ("export", ["export", str(run), "--out", str(bundle), "--force"]),
        ("update", ["update", str(bundle), "--data", str(_digit_folders(ctx.work / "demo-new", 8)), "--device",
                    ctx.device, "--json", *(["--epochs", "1", "--passes", "2"] if ctx.quick else [])]),
    ]
    return {"commands": commands, "summary": "cgil " + ", cgil ".join(name for name, _ in commands) + " prepared"}


def run_demo(ctx, state: dict) -> None:
    for name, args in state["commands"]:
        t0 = time.perf_counter()
        proc = _cli(*args)
        ok = proc.returncode == 0
        ctx.add(1, "demo", f"cgil {name}" + (f" --device {ctx.device}" if name != "export" else ""),
                "ok" if ok else "failed", seconds=time.perf_counter() - t0, note="" if ok else _tail(proc))
        if not ok:
            return


TORCHRUN_PROCESSES = 2  # two ranks: sharding, the gather, the cache broadcast and the barrier all run


def setup_torchrun(ctx) -> dict:
    """Where the 2 ranks run: NCCL on 2 GPUs when `--device cuda` sees them (one GPU per rank), else
    gloo on the CPU (NCCL refuses two ranks on one GPU, and cuda:N would put both on GPU N)."""
    import torch
    import torch.distributed as dist

    import cgil.distributed  # noqa: F401  (what the workers run)

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    gpus = torch.cuda.device_count() if ctx.cuda and not ctx.dry_run else 0
    device = "cuda" if ctx.device == "cuda" and gpus >= TORCHRUN_PROCESSES else "cpu"
    why = "" if device == "cuda" or not ctx.cuda else \
        f"; on the CPU with gloo: NCCL needs {TORCHRUN_PROCESSES} GPUs for {TORCHRUN_PROCESSES} ranks and --device cuda"
    out = ctx.work / "torchrun.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(TORCHRUN_PROCESSES),
           "-m", "benchmarks.gpu", "--torchrun-worker", "--device", device, "--out", str(out)]
    return {"cmd": cmd, "out": out, "device": device, "why": why,
            "summary": f"{TORCHRUN_PROCESSES} ranks on {device}{why}"}


def run_torchrun(ctx, state: dict) -> None:
    out = state["out"]
    t0 = time.perf_counter()
    proc = subprocess.run(state["cmd"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    item = f"feature extraction, {TORCHRUN_PROCESSES} processes"
    if proc.returncode != 0 or not out.exists():
        ctx.add(1, "torchrun", item, "failed", note=_tail(proc))
        return
    r = json.loads(out.read_text())
    ok = r["equal"] and r["world"] == TORCHRUN_PROCESSES
    ctx.add(1, "torchrun", f"{item}, {r['backend']}", "ok" if ok else "failed", seconds=time.perf_counter() - t0,
            note=f"{r['images']} images in {r['world']} ranks; gathered and cached features equal to one process: "
                 f"{r['equal']}{state['why']}")


def torchrun_worker(device: str, out: Path) -> None:
    """Run under torchrun by run_torchrun: join the group as `cgil train` does, take a shard of whole
    batches, gather (embed_items), share the feature cache through rank 0 and wait at its barrier
    (task_features), then rank 0 compares both with one process's features."""
    import tempfile

    import torch

    from cgil import distributed
    from cgil.clip import create_clip
    from cgil.data import get_dataset
    from cgil.features import _embed_local, embed_items, task_features

    distributed.init_from_env(device)
    clip = create_clip("cgil-tiny", None, device, 0)  # "cuda" is this rank's GPU: init_from_env set it current
    ds = get_dataset("digits")
    items = ds.test.items[:256]
    gathered = embed_items(clip, items, 64)
    with tempfile.TemporaryDirectory() as tmp:
        cache = distributed.broadcast(tmp)  # rank 0's folder: the cache is rank 0's alone
        cached, _ = task_features(clip, ds, "test", [0, 1], cache_dir=Path(cache))
        reread, _ = task_features(clip, ds, "test", [0, 1], cache_dir=Path(cache))
        if distributed.is_main():
            one = _embed_local(clip, items, 64, None, workers=0)
            part = ds.test.subset([0, 1])
            equal = bool(torch.equal(gathered, one) and torch.equal(cached, reread)
                         and torch.equal(cached, _embed_local(clip, part.items, 64, None, workers=0)))
            out.write_text(json.dumps({"backend": torch.distributed.get_backend(), "world": distributed.world_size(),
                                       "equal": equal, "images": len(items)}))
        distributed.barrier()
    distributed.shutdown()


def setup_resume(ctx) -> dict:
    """The run configuration the worker trains (validated here), and the worker's command."""
    from cgil.train import validate

    validate(resume_config(ctx.device, ctx.quick))
    out = ctx.work / "resume.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--resume-worker", "--device", ctx.device, "--out", str(out)]
    return {"cmd": cmd + (["--quick"] if ctx.quick else []), "out": out, "summary": "run configuration validated"}


def run_resume(ctx, state: dict) -> None:
    """Bit-for-bit resume on this device: the README claims it on the CPU; this checks CUDA."""
    out = state["out"]
    t0 = time.perf_counter()
    proc = subprocess.run(state["cmd"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        ctx.add(1, "resume", "stop after task 1, resume", "failed", note=_tail(proc))
        return
    r = json.loads(out.read_text())
    equal = r["equal"] and not r["differing_tensors"]
    ctx.add(1, "resume", "stop after task 1, resume", "ok" if equal else "failed", seconds=time.perf_counter() - t0,
            note=f"accuracy matrices equal: {r['equal']}; state tensors (head, generators, prompts) equal byte for "
                 f"byte: {not r['differing_tensors']}" + (f" (differ: {', '.join(r['differing_tensors'][:5])})"
                                                            if r["differing_tensors"] else ""))


def resume_config(device: str, quick: bool):
    from cgil.config import TrainConfig

    c = TrainConfig.for_dataset("digits", tasks=2, device=device, epochs=2 if quick else 8)
    c.generator.passes = 2 if quick else 20
    return c


def resume_worker(device: str, out: Path, quick: bool) -> None:
    from cgil.progress import Reporter
    from cgil.train import run

    work = out.parent / "resume-runs"
    quiet = Reporter(enabled=False)
    full = run(resume_config(device, quick), work / "full", reporter=quiet, cache_dir=work / "cache")
    run(resume_config(device, quick), work / "part", stop_after=0, reporter=quiet, cache_dir=work / "cache")
    resumed = run(resume_config(device, quick), work / "part", resume=True, reporter=quiet, cache_dir=work / "cache")
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
