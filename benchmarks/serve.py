"""Serving and on-device update benchmarks (tiny model, digits, CPU).

Three tables, written to serve-*-<machine>.{json,md} in --out (default outside the checkout, see common.py):
- serve-latency: requests/s and p50/p99 latency of POST /v1/classify (one PNG per request) at
  concurrency 1, 8 and 32, against a real `cgil serve` subprocess on loopback, before and during
  head swaps (a zero-shot update and a rollback published alternately while the load runs).
- serve-update: wall-clock of `cgil update` adding 2 new digit classes ("eight", "nine") to a bundle
  exported from a run on the other 8 digits, split by phase (features, generators, alignment, write),
  per generator family, with the accuracy of the updated head on the 10-class test split.
- serve-store: bytes per class of each part of the store after that update, per generator, and
  fp16 vs fp32 storage of the generator weights with its measured accuracy effect.

How the 8+2 split is made: scikit-learn's digits are written as PNG class folders; a CGIL run is
trained on `folder:` of digits 0-7 (4 tasks of 2), exported, then updated with the training images
of 8 and 9 as `--data DIR/<class>/*.png`. Accuracy is top-1 over all 10 classes on the test split.

    python -m benchmarks.serve [--quick] [--generators vae,gauss,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from cgil.choices import DEFAULT_SEED

ROOT = Path(__file__).resolve().parent.parent
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BASE_CLASSES, NEW_CLASSES = tuple(range(8)), (8, 9)


# ---------------------------------------------------------------- data and bundles (shared with the tests)

def write_digit_folders(root: Path, classes: Sequence[int], splits: Sequence[str] = ("train", "test"),
                        flat: bool = False, limit: Optional[int] = None) -> Path:
    """Digits as PNG files: root/<split>/<name>/NNNN.png (flat=True: root/<name>/NNNN.png, first split only)."""
    from PIL import Image

    from cgil.data import get_dataset

    ds = get_dataset("digits")
    for split in splits:
        s = getattr(ds, split)
        count: dict[int, int] = {}
        for i, (img, label) in enumerate(zip(s.items, s.labels)):
            label = int(label)
            if label not in classes or (limit is not None and count.get(label, 0) >= limit):
                continue
            count[label] = count.get(label, 0) + 1
            d = (root if flat else root / split) / DIGIT_NAMES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")
        if flat:
            break
    return root


def build_base_bundle(work: Path, generator: str = "vae", passes: int = 20, epochs: int = 8, tasks: int = 4,
                      seed: int = DEFAULT_SEED, max_batch: int = 32) -> Path:
    """Train CGIL on digits 0-7 (folder dataset) and export it: the device's starting bundle."""
    from cgil.config import TrainConfig
    from cgil.progress import Reporter
    from cgil.train import run
    from export.bundle import export_bundle

    data = work / "digits8"
    if not data.exists():
        write_digit_folders(data, BASE_CLASSES)
    cfg = TrainConfig.for_dataset(f"folder:{data}", generator=generator, tasks=tasks, seed=seed)
    cfg.generator.passes, cfg.align.epochs = passes, epochs
    run_dir = work / f"run-{generator}"
    run(cfg, run_dir, reporter=Reporter(enabled=False))
    bundle = work / f"bundle-{generator}"
    export_bundle(run_dir, bundle, max_batch=max_batch)
    return bundle


def new_class_data(work: Path) -> Path:
    d = work / "new-classes"
    if not d.exists():
        write_digit_folders(d, NEW_CLASSES, splits=("train",), flat=True)
    return d


def test_folder(work: Path) -> Path:
    d = work / "digits-test"
    if not d.exists():
        write_digit_folders(d, range(10), splits=("test",), flat=True)
    return d


def accuracy(bundle: Path, test_dir: Path, classes: Optional[Sequence[str]] = None) -> float:
    """Top-1 accuracy (%) of the bundle's current head on test_dir/<class>/*.png (all classes by default)."""
    from runtime import Classifier

    clf = Classifier(bundle, backend="onnxruntime")
    hits = total = 0
    for d in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        if classes is not None and d.name not in classes:
            continue
        files = sorted(d.glob("*.png"))
        preds = clf.predict(files, top_k=1)
        hits += sum(p.labels[0] == d.name for p in preds)
        total += len(files)
    return 100.0 * hits / max(total, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0, proc: Optional[subprocess.Popen] = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


# ---------------------------------------------------------------- load generation

def load(url: str, body: bytes, concurrency: int, requests_per_worker: int) -> dict[str, Any]:
    """`concurrency` threads, each with its own keep-alive client, POST one image per request."""
    import httpx

    latencies: list[float] = []
    versions: set[int] = set()
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        mine, seen, bad = [], set(), []
        with httpx.Client(base_url=url, timeout=30.0) as c:
            c.get("/healthz")
            barrier.wait()
            for _ in range(requests_per_worker):
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/classify?top_k=1", content=body, headers={"content-type": "image/png"})
                    if r.status_code == 200:
                        seen.add(r.json()["head_version"])
                    else:
                        bad.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as e:
                    bad.append(repr(e))
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)
            versions.update(seen)
            failures.extend(bad)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    from runtime.server import percentile

    return {"requests": len(latencies), "failures": len(failures), "failure_examples": failures[:3],
            "rps": len(latencies) / wall, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "versions": sorted(versions), "seconds": wall}


class Swapper(threading.Thread):
    """Publishes heads while the load runs: a zero-shot class, then a rollback, again and again."""

    def __init__(self, bundle: Path, interval: float = 0.3):
        super().__init__(daemon=True)
        self.bundle, self.interval = bundle, interval
        self.stop = threading.Event()
        self.published: list[int] = []
        self.swaps = 0

    def run(self) -> None:
        from runtime.heads import add_zero_shot, rollback

        k = 0
        while not self.stop.wait(self.interval):
            if k % 2 == 0:
                name = f"swap class {time.time_ns()}"  # unique: names are never reused
                self.published.append(add_zero_shot(self.bundle, [name])["version"])
            else:
                rollback(self.bundle)
            k += 1
            self.swaps += 1


def bench_serving(bundle: Path, work: Path, concurrencies: Sequence[int], requests: int, max_batch: int = 32,
                  max_wait_ms: float = 5.0) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = next(iter(sorted((test_folder(work) / "three").glob("*.png")))).read_bytes()
    cmd = [sys.executable, "-m", "cli", "serve", str(bundle), "--port", str(port), "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), "--log-level", "warning", "--watch", "0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = []
    try:
        wait_ready(url, proc=proc)
        load(url, body, 4, 25)  # warm-up
        for conc in concurrencies:
            per_worker = max(1, requests // conc)
            for phase in ("before swap", "during swaps"):
                swapper = Swapper(bundle) if phase == "during swaps" else None
                if swapper:
                    swapper.start()
                r = load(url, body, conc, per_worker)
                if swapper:
                    swapper.stop.set()
                    swapper.join()
                rows.append({"concurrency": conc, "phase": phase, "requests": r["requests"], "failures": r["failures"],
                             "req_per_s": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                             "swaps": swapper.swaps if swapper else 0, "head_versions_seen": len(r["versions"])})
                print(f"  c={conc:>2} {phase:<12} {r['rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                      f"p99 {r['p99_ms']:6.1f} ms  failures {r['failures']}  versions {r['versions']}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


# ---------------------------------------------------------------- updates and store sizes

def timed_update(bundle: Path, data: Path, *args: str) -> dict[str, Any]:
    """`cgil update` as a subprocess: its wall-clock, and the phase split it reports (--json)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cli", "update", str(bundle), "--data", str(data), "--json", *args],
                         cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"cgil update failed: {out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def fp16_effect(base: Path, work: Path, seeds: Sequence[int], epochs: int, passes: int) -> list[dict[str, Any]]:
    """The same update (same seed) with the store kept in fp32 and in fp16: accuracy and bytes, per seed."""
    from runtime.store_info import store_info

    data, tests = new_class_data(work), test_folder(work)
    rows = []
    for seed in seeds:
        for precision in ("fp32", "fp16"):
            b = work / f"fp16-effect-{seed}-{precision}"
            shutil.rmtree(b, ignore_errors=True)
            shutil.copytree(base, b)
            timed_update(b, data, "--epochs", str(epochs), "--passes", str(passes), "--seed", str(seed),
                         "--store-precision", precision)
            info = store_info(b)
            rows.append({"seed": seed, "store": precision, "acc_all10_%": accuracy(b, tests),
                         "acc_new2_%": accuracy(b, tests, ["eight", "nine"]), "acc_old8_%": accuracy(b, tests, DIGIT_NAMES[:8]),
                         "generator_B_per_class": sum(c["generator_bytes"] for c in info["classes"]) / len(info["classes"])})
            print(f"  seed {seed} {precision}: {rows[-1]}", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    from benchmarks.common import add_out_option, default_out_dir, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and tiny budgets (smoke test)")
    ap.add_argument("--generators", default="vae,mog,gauss,diffusion")
    ap.add_argument("--passes", type=int, default=20, help="generator passes (base run and update)")
    ap.add_argument("--epochs", type=int, default=8, help="alignment epochs (base run and update)")
    ap.add_argument("--requests", type=int, default=640, help="requests per (concurrency, phase)")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="keep bundles here (default: a temp dir)")
    add_out_option(ap)
    ap.add_argument("--fp16-base", type=Path, default=None,
                    help="only measure fp16 vs fp32 store on this (VAE) base bundle, over --seeds")
    ap.add_argument("--seeds", default="1,2,3")
    a = ap.parse_args(argv)
    if a.quick:
        a.passes, a.epochs, a.requests, a.generators = 2, 1, 64, "gauss"
    work = a.work or Path(tempfile.mkdtemp(prefix="cgil-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.serve " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.fp16_base is not None:
        seeds = [int(x) for x in a.seeds.split(",")]
        rows = fp16_effect(a.fp16_base, work, seeds, a.epochs, a.passes)
        for precision in ("fp32", "fp16"):
            sel = [r for r in rows if r["store"] == precision]
            rows.append({"seed": "mean", "store": precision,
                         **{k: sum(r[k] for r in sel) / len(sel) for k in sel[0] if k not in ("seed", "store")}})
        write_results("serve-fp16", rows, {"command": command, "base": str(a.fp16_base), "epochs": a.epochs,
                                           "passes": a.passes, "note": "same update and seed, store fp32 vs fp16; "
                                           "with fp16 the alignment samples the fp16 round-trip of every generator"}, a.out_dir)
        return
    gens = a.generators.split(",")
    data, tests = new_class_data(work), test_folder(work)
    update_rows, store_rows = [], []
    first_bundle = None
    for gen in gens:
        t0 = time.perf_counter()
        base = build_base_bundle(work, gen, a.passes, a.epochs)
        print(f"[{gen}] base bundle (digits 0-7) in {time.perf_counter() - t0:.0f}s; "
              f"accuracy on 0-7: {accuracy(base, tests, DIGIT_NAMES[:8]):.1f}%", flush=True)
        first_bundle = first_bundle or base
        for precision in (("fp32", "fp16") if gen == "vae" else ("fp32",)):
            b = work / f"bundle-{gen}-{precision}"
            shutil.copytree(base, b)
            r = timed_update(b, data, "--epochs", str(a.epochs), "--passes", str(a.passes), "--store-precision", precision)
            acc_all, acc_new = accuracy(b, tests), accuracy(b, tests, ["eight", "nine"])
            row = {"generator": gen, "store": precision, "wall_s": r["wall_s"],
                   **{f"{k}_s": v for k, v in r["timings"].items()},
                   "acc_all10_%": acc_all, "acc_new2_%": acc_new}
            update_rows.append(row)
            print(f"[{gen}/{precision}] update {r['wall_s']:.1f}s {r['timings']} acc {acc_all:.1f}% (new {acc_new:.1f}%)",
                  flush=True)
            from runtime.store_info import store_info

            info = store_info(b)
            new = [c for c in info["classes"] if c["class"] in ("eight", "nine")]
            mean = lambda k: sum(c[k] for c in new) / len(new)  # noqa: E731
            store_rows.append({"generator": gen, "store": precision, "D": info["embed_dim"],
                               "generator_B": mean("generator_bytes"), "prompt_B": mean("prompt_bytes"),
                               "context_B": mean("context_bytes"), "key_B": mean("key_bytes"),
                               "total_B": mean("total_bytes"), "raw_features_B": mean("raw_features_bytes"),
                               "raw_images_B": mean("raw_images_bytes"), "images": mean("images"),
                               "acc_all10_%": acc_all})
    meta = {"command": command, "model": "cgil-tiny (random weights, D=64, 32x32 input)",
            "base": "CGIL run on digits 0-7 (folder dataset, 4 tasks), exported fp32 ONNX",
            "update": "2 new classes (eight, nine): all their digits training images",
            "passes": a.passes, "epochs": a.epochs,
            "note": "machine shared with other jobs; timings are wall-clock under that load"}
    write_results("serve-update", update_rows, meta, a.out_dir)
    write_results("serve-store", store_rows, meta, a.out_dir)
    if not a.skip_serving and first_bundle is not None:
        b = work / "bundle-serving"
        shutil.copytree(first_bundle, b)
        rows = bench_serving(b, work, (1, 8, 32), a.requests)
        write_results("serve-latency", rows, {**meta, "requests": "one 8x8 PNG digit per request, raw body",
                                              "server": "cgil serve --max-batch 32 --max-wait-ms 5 --watch 0.1 (subprocess)",
                                              "client": "Python threads, one httpx keep-alive client each"}, a.out_dir)
    print(f"results in {a.out_dir or default_out_dir()}")


if __name__ == "__main__":
    main()
