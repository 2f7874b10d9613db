"""`cgil bench store`: bytes per class of the replay store, and what each option costs in accuracy.

Options compared, per class:
- each generator's replay store (the sampling-only state_dict that `Learner.store_state` saves),
  in fp32, fp16 and (VAE, diffusion) int8 with one fp16 scale per output unit of every weight matrix;
- a smaller VAE (hidden 256, latent 128: an explicit option, not the reference default);
- keeping the raw features (n x D x 4 bytes) or the raw images (measured encoded sizes).

Bytes come from the real tensors at D = 512 and 768 (and the tiny model's D). Final accuracy comes
from a class-incremental run on digits with the tiny model, where the store is cast to the given
precision and back right after fitting, before it is sampled for alignment. Keeping raw features
or raw images gives the same accuracy (the image encoder is frozen and its preprocessing fixed):
both are "joint" prompt tuning on the real features of all seen classes.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from benchmarks.common import add_out_option, add_threads_option, apply_threads, log, markdown_table, write_results
from cgil.choices import DEFAULT_SEED

MB = 1_000_000
TARGET_BYTES = 1 * MB  # default generator's store per class at D = 768
VARIANTS = [  # (label, generator kind, config overrides, precisions)
    ("vae", "vae", {}, ("fp32", "fp16", "int8")),
    ("vae-small", "vae", {"hidden_dim": 256, "latent_dim": 128}, ("fp32", "fp16", "int8")),
    ("mog", "mog", {}, ("fp32", "fp16")),
    ("gauss", "gauss", {}, ("fp32", "fp16")),
    ("diffusion", "diffusion", {}, ("fp32", "fp16", "int8")),
]


# ---------------------------------------------------------------- precision of the store

def _is_matrix(name: str, t: torch.Tensor) -> bool:
    return name.endswith("weight") and t.ndim == 3


def store_bytes(state: dict[str, torch.Tensor], precision: str, num_classes: int) -> float:
    """Bytes per class of a K-class group's state_dict stored at `precision` (shared buffers split over K)."""
    total = 0
    for name, t in state.items():
        if precision == "fp32":
            total += t.numel() * 4
        elif precision == "fp16" or not _is_matrix(name, t):
            total += t.numel() * 2
        else:  # int8 weights + one fp16 scale per (class, output unit)
            total += t.numel() + t.shape[0] * t.shape[2] * 2
    return total / num_classes


def quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-unit int8 of a (K, in, out) weight, returned dequantised (fp32)."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12).half().float()
    return (w / scale).round().clamp(-127, 127) * scale


@torch.no_grad()
def cast_store_(group: torch.nn.Module, precision: str) -> None:
    """Round-trip a fitted group's tensors through `precision`, in place (what a stored copy holds)."""
    if precision == "fp32":
        return
    jitter = torch.Generator().manual_seed(int(precision[len("jitter"):])) if precision.startswith("jitter") else None
    for name, t in group.state_dict().items():  # views of the parameters and buffers
        if not t.is_floating_point():
            continue
        if jitter is not None:  # control: fp32 plus random relative noise of fp16's size (2^-11)
            t.mul_(1 + 2.0 ** -11 * torch.randn(t.shape, generator=jitter))
        elif precision == "int8" and _is_matrix(name, t):
            t.copy_(quantize_int8(t.float()))
        else:
            t.copy_(t.half().float())


def generator_group(kind: str, overrides: dict, dim: int, k: int):
    from cgil.generators import GeneratorConfig, make_generators

    group = make_generators(GeneratorConfig(kind=kind, **overrides), list(range(k)), dim)
    group.build_empty()  # the sampling-only tensors (what from_replay loads), shapes as after fit
    return group


# ---------------------------------------------------------------- raw images

def image_sizes(dataset) -> dict[str, float]:
    """Mean encoded bytes per image: the dataset's own images as PNG, and natural photos as JPEG."""
    from PIL import Image

    from cgil.data import load_image

    def encoded(img: "Image.Image", fmt: str, **kw) -> int:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.tell()

    items = dataset.train.items[:200]
    out = {"dataset_png": sum(encoded(load_image(it), "PNG") for it in items) / len(items)}
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images()
        files = [Path(f).stat().st_size for f in photos.filenames]
        crops = []
        for arr in photos.images:
            img = Image.fromarray(arr)
            s = 224 / min(img.size)
            img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BICUBIC)
            left, top = (img.size[0] - 224) // 2, (img.size[1] - 224) // 2
            crops.append(encoded(img.crop((left, top, left + 224, top + 224)), "JPEG", quality=90))
        out["photo_jpeg_640x427"] = sum(files) / len(files)
        out["photo_jpeg_224_q90"] = sum(crops) / len(crops)
    except Exception:  # sample photos missing: report the dataset's images only
        pass
    return out


# ---------------------------------------------------------------- accuracy of each option

def run_variant(cfg, precision: str, replay: str, cache_dir: Optional[Path]) -> dict[str, Any]:
    """Class-incremental run with the same seeds as `cgil.train.run`; the store is cast before alignment."""
    from cgil.evaluate import score_step
    from cgil.learner import Learner, derive_seed
    from cgil.metrics import summarize
    from cgil.progress import Reporter
    from cgil.train import prepare

    with tempfile.TemporaryDirectory(prefix="cgil-bench-store-") as tmp:
        ctx = prepare(cfg, Path(tmp), False, Reporter(enabled=False), cache_dir)
        sc, ds = ctx.scenario, ctx.dataset
        torch.manual_seed(cfg.seed)
        tests = [ctx.features("test", k) for k in range(sc.num_tasks)]
        learner = Learner(ctx.clip, cfg.generator, cfg.align, n_ctx=cfg.n_ctx)
        zero_shot = learner.text.zero_shot(ds.classnames).cpu()
        acc, transfer, seen = [], [], []
        start = time.perf_counter()
        for t in range(sc.num_tasks):
            classes = sc.task_classes(t)
            train = ctx.features("train", t)
            seen.append(train)
            learner.add_classes(classes, [ds.classnames[c] for c in classes], derive_seed(cfg.seed, t, 1))
            if replay == "generators":
                learner.fit_generators(classes, *train, seed=cfg.seed)
                cast_store_(learner.store[-1], precision)
                source = learner.replay_source()
            else:  # raw features (or raw images re-encoded: identical features) of every seen class
                feats = torch.cat([f for f, _ in seen])
                feats = feats.half().float() if precision == "fp16" else feats
                source = Learner.real_source(feats, torch.cat([l for _, l in seen]))
            learner.align(source, seed=derive_seed(cfg.seed, t, 2))
            scores = score_step(learner.head(), learner.class_ids, zero_shot, tests, sc.tasks(), t)
            acc.append(scores.class_il)
            transfer.append(scores.transfer)
        summary = summarize(acc, [len(l) for _, l in tests], transfer)
        summary["seconds"] = time.perf_counter() - start
        summary["n_per_class"] = float(sum(len(l) for _, l in seen)) / ds.num_classes
        summary["dim"] = int(tests[0][0].shape[1])
        return summary


# ---------------------------------------------------------------- CLI

def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cgil bench store", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (seconds): a smoke run, not a measurement")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    p.add_argument("--n-per-class", type=int, default=100, help="raw features/images kept per class (default 100)")
    p.add_argument("--dataset", default="digits", help="accuracy runs: digits or folder:PATH")
    p.add_argument("--model", default=None, help="open_clip model for the accuracy runs (default cgil-tiny)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--tasks", type=int, default=None, help="number of tasks (default: dataset's split)")
    p.add_argument("--passes", type=int, default=None, help="VAE/diffusion passes (default: dataset preset)")
    p.add_argument("--epochs", type=int, default=None, help="alignment epochs (default: dataset preset)")
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {[v[0] for v in VARIANTS]}")
    p.add_argument("--no-accuracy", action="store_true", help="bytes only")
    p.add_argument("--noise-control", type=int, default=3, metavar="N",
                   help="for mog and gauss, N extra runs with the fp32 store perturbed by random relative noise "
                        "of fp16's size: how much accuracy moves from any tiny change (default 3; 0 = none)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    add_threads_option(p)
    add_out_option(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from cgil.config import TrainConfig
    from cgil.data import get_dataset
    from cgil.features import default_cache_dir

    args = parse(argv)
    apply_threads(args.threads)
    variants = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    base: dict[str, Any] = {"seed": args.seed}
    if args.model:
        base["model"] = args.model
    if args.pretrained:
        base["pretrained"] = args.pretrained
    if args.tasks:
        base["tasks"] = args.tasks
    passes = args.passes or (2 if args.quick else None)
    epochs = args.epochs or (2 if args.quick else None)

    def config(kind: str, overrides: dict, method: str = "cgil"):
        cfg = TrainConfig.for_dataset(args.dataset, method=method, generator=kind, **base)
        if passes:
            cfg.generator.passes = passes
        if epochs:
            cfg.align.epochs = epochs
        for key, value in overrides.items():
            setattr(cfg.generator, key, value)
        if args.quick:
            cfg.generator.em_steps = 5
        return cfg

    dataset = get_dataset(args.dataset)
    images = image_sizes(dataset)
    k = 10
    rows: list[dict[str, Any]] = []
    cache_dir = default_cache_dir()
    raw_acc = None
    if not args.no_accuracy:
        log("accuracy: raw features (joint on real features of all seen classes)")
        raw_acc = run_variant(config("vae", {}, "joint"), "fp32", "raw", cache_dir)
        raw_acc_fp16 = run_variant(config("vae", {}, "joint"), "fp16", "raw", cache_dir)
    for label, kind, overrides, precisions in variants:
        for precision in precisions:
            row: dict[str, Any] = {"option": f"{label} store", "precision": precision}
            for dim in args.dims:
                group = generator_group(kind, overrides, dim, k)
                row[f"bytes/class D={dim}"] = store_bytes(group.state_dict(), precision, k)
            acc = None
            if not args.no_accuracy:
                acc = run_variant(config(kind, overrides), precision, "generators", cache_dir)
                group = generator_group(kind, overrides, acc["dim"], k)
                row[f"bytes/class tiny D={acc['dim']}"] = store_bytes(group.state_dict(), precision, k)
                row["final_avg_acc"] = acc["final_avg_acc"]
                row["final_pooled_acc"] = acc["final_pooled_acc"]
                row["run_s"] = acc["seconds"]
            rows.append(row)
            log(f"  {label:10s} {precision}: " + ", ".join(
                f"{c}={v:.4g}" for c, v in row.items() if isinstance(v, float)))
    controls = []
    if not args.no_accuracy:
        for label, kind, overrides, _ in variants:
            if kind not in ("mog", "gauss"):
                continue
            for seed in range(1, args.noise_control + 1):
                acc = run_variant(config(kind, overrides), f"jitter{seed}", "generators", cache_dir)
                controls.append({"option": f"{label} store", "control": f"fp32 + 2^-11 relative noise, seed {seed}",
                                 "final_avg_acc": acc["final_avg_acc"], "final_pooled_acc": acc["final_pooled_acc"]})
                log(f"  control {label} jitter seed {seed}: final_avg_acc={acc['final_avg_acc']:.2f}")
    n = args.n_per_class
    raw_rows = [
        ("raw features", "fp32", lambda d: n * d * 4),
        ("raw features", "fp16", lambda d: n * d * 2),
        (f"raw images ({args.dataset} PNG)", "uint8", lambda d: n * images["dataset_png"]),
    ]
    if "photo_jpeg_224_q90" in images:
        raw_rows += [
            ("raw images (224x224 photo JPEG q90)", "uint8", lambda d: n * images["photo_jpeg_224_q90"]),
            ("raw images (640x427 photo JPEG as shipped)", "uint8", lambda d: n * images["photo_jpeg_640x427"]),
        ]
    for option, precision, size in raw_rows:
        row = {"option": f"{option}, n={n}", "precision": precision}
        for dim in args.dims:
            row[f"bytes/class D={dim}"] = float(size(dim))
        if raw_acc is not None:
            acc = raw_acc_fp16 if precision == "fp16" else raw_acc
            if option.startswith("raw features"):
                row[f"bytes/class tiny D={acc['dim']}"] = float(size(acc["dim"]))
            row["final_avg_acc"] = acc["final_avg_acc"]
            row["final_pooled_acc"] = acc["final_pooled_acc"]
            row["run_s"] = acc["seconds"]
        rows.append(row)

    default = next((r for r in rows if r["option"] == "vae store" and r["precision"] == "fp32"), None)
    target = None
    if default is not None and "bytes/class D=768" in default:
        passing = [f"{r['option']} {r['precision']}" for r in rows
                   if r["option"].startswith("vae") and r.get("bytes/class D=768", 1e18) <= TARGET_BYTES]
        target = {"default_vae_fp32_bytes_D768": default["bytes/class D=768"], "target_bytes": TARGET_BYTES,
                  "met_by_default": default["bytes/class D=768"] <= TARGET_BYTES, "vae_options_meeting_it": passing}
    columns = ["option", "precision"] + [f"bytes/class D={d}" for d in args.dims]
    if raw_acc is not None:
        columns += [f"bytes/class tiny D={raw_acc['dim']}", "final_avg_acc", "final_pooled_acc", "run_s"]
    command = "cgil bench store " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command.strip(),
        "threads": torch.get_num_threads(),
        "accuracy_setup": None if raw_acc is None else {
            "dataset": args.dataset, "model": args.model or "cgil-tiny", "seed": args.seed,
            "passes": config("vae", {}).generator.passes, "epochs": config("vae", {}).align.epochs,
            "train_features_per_class": raw_acc["n_per_class"]},
        "image_bytes": images,
        "noise_control": controls,
        "target": target,
        "notes": [
            "bytes/class = bytes of the sampling-only state_dict of a 10-class group / 10 (shared buffers such "
            "as the diffusion schedule split over the group); int8 = int8 weight matrices + one fp16 scale per "
            "class and output unit, every other tensor fp16",
            f"raw features/images: n={n} per class (ImageNet-R has about 120 training images per class)",
            "accuracy: class-IL final average accuracy (per-task mean) and pooled accuracy, percent; the store is "
            "cast to the precision and back right after fitting, before replay; raw features and raw images "
            "share one run (identical features: frozen encoder, fixed preprocessing)",
        ],
    }
    path = write_results("store", rows, meta, out_dir=args.out_dir, columns=columns)
    from benchmarks.common import machine

    text = (f"# store: replay store per class\n\nCommand: `{meta['command']}`\n\n" + markdown_table(rows, columns)
            + f"\nTarget (default VAE store <= 1 MB/class at D=768): {target}\n\n"
            + ("Noise control (how far accuracy moves when the fp32 store gets random relative noise of fp16's "
               "size, i.e. the run-to-run spread of this setup):\n\n" + markdown_table(controls) + "\n"
               if controls else "")
            + "Notes:\n\n" + "".join(f"- {x}\n" for x in meta["notes"]))
    path.with_suffix(".md").write_text(f"Machine: {machine()}\n\n" + text)
    print(text)
    return {"json": str(path), "rows": rows, "target": target}


if __name__ == "__main__":
    main()
