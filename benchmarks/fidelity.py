"""`cgil bench fidelity`: cgil against the reference CGIL implementation on identical inputs.

The reference results are a fixture file measured with the authors' code on cgil's own digits
features (`../shared/fidelity/reference_digits.json` next to the repository, or `--reference PATH`);
it is read at run time and its settings (model, model seed, VAE passes / lr / widths, alignment
epochs / lr) are the settings cgil runs with here. Two measurements:

1. Replay, per class: the class's VAE is fitted on its real training features (one batched fit of all
   classes; a class's generator sees only its own features, so this does not depend on the class
   order), then 1000 samples are compared with those features: variance ratio tr C_gen / tr C_real and
   Frechet distance, averaged over the generator seeds (range shown), next to the reference's values
   (one reference seed). Targets: ratio within +-15% of the reference's,
   FD <= 1.2x the reference's. Both VAE objectives are measured unless `--objectives` says otherwise.
2. End to end: full `cgil train` runs for every class order of the fixture x `--gen-seeds` generator
   seeds: final average accuracy per order, mean and spread, against the reference's (target: mean over
   orders x seeds >= the reference's mean - 1 point). CPU seconds (process time) per run are reported.

`--quick` is a smoke run with tiny budgets (seconds): it exercises the code, it measures nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from runtime.errors import CgilError

from benchmarks.common import add_out_option, add_threads_option, apply_threads, log, machine, markdown_table, write_results

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fidelity" / "reference_digits.json"
RATIO_TOLERANCE = 0.15
FD_FACTOR = 1.2
ACCURACY_MARGIN = 1.0


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cgil bench fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="the reference fixture (JSON)")
    p.add_argument("--objectives", nargs="+", default=["reference", "textbook"], help="VAE objectives for the replay table")
    p.add_argument("--gen-seeds", type=int, nargs="+", default=[0, 1, 2], help="generator seeds per class order")
    p.add_argument("--orders", type=int, nargs="*", default=None, help="class-order seeds (default: the fixture's)")
    p.add_argument("--skip-end-to-end", action="store_true", help="replay table only")
    p.add_argument("--skip-replay", action="store_true", help="end-to-end runs only")
    p.add_argument("--reference-code", type=Path, default=None,
                   help="a checkout of aimagelab/mammoth: also fit its own generators on the same features")
    p.add_argument("--reference-kinds", nargs="+", default=["vae"], help="with --reference-code: vae mog gauss diffusion")
    p.add_argument("--autograd-loop", action="store_true",
                   help="fit cgil's VAEs with the batched autograd loop (vae_cpu_step off) instead of the CPU default, "
                        "the hand-written step it equals bit for bit (slower; a check, not a variant)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not a measurement")
    add_threads_option(p)
    add_out_option(p)
    return p.parse_args(argv)


def load_reference(path: Path) -> dict[str, Any]:
    from runtime.errors import CgilError

    if not path.exists():
        raise CgilError(f"reference fixture not found: {path} (give --reference PATH)")
    return json.loads(path.read_text())


def train_config(ref: dict[str, Any], order: int, gen_seed: Optional[int], quick: bool, autograd_loop: bool = False):
    from cgil.config import TrainConfig

    inp, st = ref["inputs"], ref["settings"]
    cfg = TrainConfig.for_dataset(inp["dataset"].split()[0], model=inp["model"], model_seed=inp["model_seed"],
                                  pretrained=inp["pretrained"], seed=order, method="cgil", generator=st["generator"])
    cfg.generator.passes = 2 if quick else st["vae_passes"]
    cfg.generator.lr = st["vae_lr"]
    cfg.generator.hidden_dim, cfg.generator.latent_dim = st["vae_hidden"], st["vae_latent"]
    cfg.generator.seed = gen_seed
    cfg.generator.vae_cpu_step = not autograd_loop
    cfg.align.epochs = 2 if quick else st["align_epochs"]
    cfg.align.lr = st["align_lr"]
    cfg.align.batch_size, cfg.align.samples_per_class = st["batch"], st["samples_per_class"]
    cfg.n_ctx = st["n_ctx"]
    return cfg


def class_features(ref: dict[str, Any], runs_dir: Path):
    """{class id: real training features}, through cgil's own feature path (cached like a run's)."""
    from cgil.features import default_cache_dir
    from cgil.progress import Reporter
    from cgil.train import prepare

    ctx = prepare(train_config(ref, 0, None, True), runs_dir / "features", False, Reporter(enabled=False),
                  default_cache_dir())
    out = {}
    for t in range(ctx.scenario.num_tasks):
        feats, labels = ctx.features("train", t)
        for c in labels.unique().tolist():
            out[int(c)] = feats[labels == c]
    return dict(sorted(out.items()))


def replay_rows(ref: dict[str, Any], feats: dict[int, torch.Tensor], objective: str, seeds: Sequence[int],
                quick: bool, autograd_loop: bool = False):
    """Per class: replay quality for each generator seed, its mean and range, against the reference's."""
    from cgil.generators import make_generators
    from cgil.metrics import REPLAY_SAMPLES, replay_quality

    ids = list(feats)
    per_seed: dict[int, list[dict]] = {c: [] for c in ids}
    cpu = []
    for seed in seeds:
        cfg = train_config(ref, 0, seed, quick, autograd_loop).generator
        cfg.vae_objective = objective
        group = make_generators(cfg, ids, next(iter(feats.values())).shape[1])
        start = time.process_time()
        group.fit([feats[c] for c in ids], seed=seed)
        cpu.append(time.process_time() - start)
        samples = group.sample(REPLAY_SAMPLES, torch.Generator().manual_seed(seed)).cpu()
        for k, c in enumerate(ids):
            per_seed[c].append(replay_quality(samples[k].numpy(), feats[c].numpy()))
    rows = []
    for c in ids:
        ratios = [q["variance_ratio"] for q in per_seed[c]]
        fds = [q["frechet"] for q in per_seed[c]]
        ratio, fd = statistics.mean(ratios), statistics.mean(fds)
        r = ref["replay_per_class"].get(str(c), {})
        ratio_rel = ratio / r["variance_ratio"] if r else None
        fd_rel = fd / r["frechet"] if r else None
        rows.append({"objective": objective, "class": c, "variance_ratio": ratio,
                     "ratio_range": f"{min(ratios):.3f}-{max(ratios):.3f}", "ref_variance_ratio": r.get("variance_ratio"),
                     "ratio_vs_ref": ratio_rel, "frechet": fd, "fd_range": f"{min(fds):.3f}-{max(fds):.3f}",
                     "ref_frechet": r.get("frechet"), "fd_vs_ref": fd_rel,
                     "ratio_ok": ratio_rel is not None and abs(ratio_rel - 1) <= RATIO_TOLERANCE,
                     "fd_ok": fd_rel is not None and fd_rel <= FD_FACTOR})
    return rows, cpu


def against_reference_code(replay: list[dict], ref_code: list[dict]) -> None:
    """Per class, cgil's mean over its generator seeds against the reference code's mean over the same seeds
    (run here): one seed of each moves a class's statistics by more than the targets' tolerance."""
    for row in replay:
        runs = [r for r in ref_code if r["kind"] == "vae" and r["class"] == row["class"]]
        if not runs:
            continue
        ratio = statistics.mean(r["variance_ratio"] for r in runs)
        fd = statistics.mean(r["frechet"] for r in runs)
        row.update({"ref_code_variance_ratio": ratio, "ratio_vs_ref_code": row["variance_ratio"] / ratio,
                    "ref_code_frechet": fd, "fd_vs_ref_code": row["frechet"] / fd,
                    "ratio_ok_vs_ref_code": abs(row["variance_ratio"] / ratio - 1) <= RATIO_TOLERANCE,
                    "fd_ok_vs_ref_code": row["frechet"] / fd <= FD_FACTOR})


def end_to_end(ref: dict[str, Any], orders: Sequence[int], seeds: Sequence[int], runs_dir: Path, quick: bool,
               autograd_loop: bool = False):
    from cgil.progress import Reporter
    from cgil.train import run

    rows = []
    for order in orders:
        accs = []
        for s in seeds:
            cfg = train_config(ref, order, s, quick, autograd_loop)
            start = time.process_time()
            m = run(cfg, runs_dir / f"order{order}-seed{s}", reporter=Reporter(enabled=False), plots=False)
            cpu = time.process_time() - start
            accs.append(m["final_avg_acc"])
            log(f"order {order} gen seed {s}: final avg acc {m['final_avg_acc']:.2f}%  cpu {cpu:.1f}s  "
                f"(generators {m['timings']['generators']:.1f}s wall, alignment {m['timings']['alignment']:.1f}s wall)")
            rows.append({"order": order, "gen_seed": s, "final_avg_acc": m["final_avg_acc"], "cpu_s": cpu,
                         "fit_wall_s": m["timings"]["generators"], "align_wall_s": m["timings"]["alignment"],
                         "fit_cpu_s": m["cpu_timings"]["generators"], "align_cpu_s": m["cpu_timings"]["alignment"]})
        refacc = ref["end_to_end"].get(str(order), {}).get("final_avg_acc")
        log(f"order {order}: cgil {statistics.mean(accs):.2f} (min {min(accs):.2f}, max {max(accs):.2f}) "
            f"vs reference {refacc}")
    return rows


def summary(replay: list[dict], e2e: list[dict], ref: dict[str, Any], orders: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for obj in sorted({r["objective"] for r in replay}):
        rows = [r for r in replay if r["objective"] == obj]
        out[f"replay[{obj}]"] = {
            "mean_variance_ratio": statistics.mean(r["variance_ratio"] for r in rows),
            "ref_mean_variance_ratio": statistics.mean(r["ref_variance_ratio"] for r in rows),
            "mean_frechet": statistics.mean(r["frechet"] for r in rows),
            "ref_mean_frechet": statistics.mean(r["ref_frechet"] for r in rows),
            "classes_ratio_within_15pct": sum(r["ratio_ok"] for r in rows),
            "classes_fd_within_1.2x": sum(r["fd_ok"] for r in rows),
            "classes": len(rows),
        }
        if any("ratio_ok_vs_ref_code" in r for r in rows):
            out[f"replay[{obj}]"].update({
                "classes_ratio_within_15pct_of_ref_code_mean": sum(r.get("ratio_ok_vs_ref_code", False) for r in rows),
                "classes_fd_within_1.2x_of_ref_code_mean": sum(r.get("fd_ok_vs_ref_code", False) for r in rows)})
    if e2e:
        accs = [r["final_avg_acc"] for r in e2e]
        refs = [ref["end_to_end"][str(o)]["final_avg_acc"] for o in orders if str(o) in ref["end_to_end"]]
        mean = statistics.mean(accs)
        ref_mean = statistics.mean(refs) if refs else None
        out["end_to_end"] = {
            "mean": mean, "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs),
            "max": max(accs), "runs": len(accs), "ref_mean": ref_mean,
            "per_order": {str(o): statistics.mean(r["final_avg_acc"] for r in e2e if r["order"] == o) for o in orders},
            "target_met": ref_mean is not None and mean >= ref_mean - ACCURACY_MARGIN,
            "cpu_s_per_run_mean": statistics.mean(r["cpu_s"] for r in e2e),
            "ref_cpu_s_note": ref.get("cpu_seconds_note"),
        }
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    apply_threads(args.threads)
    ref = load_reference(args.reference)
    orders = args.orders if args.orders is not None else [int(o) for o in ref["end_to_end"]]
    seeds = args.gen_seeds[:1] if args.quick else args.gen_seeds
    if args.quick:
        orders = orders[:1]
    replay, cpu = [], {}
    with tempfile.TemporaryDirectory(prefix="cgil-bench-fidelity-") as tmp:
        if not args.skip_replay:
            feats = class_features(ref, Path(tmp))
            for obj in args.objectives:
                log(f"replay: fitting {len(feats)} VAEs ({obj} objective)")
                rows, cpu[obj] = replay_rows(ref, feats, obj, seeds, args.quick, autograd_loop=args.autograd_loop)
                replay += rows
        ref_code = []
        if args.reference_code is not None:
            feats = feats if not args.skip_replay else class_features(ref, Path(tmp))
            ref_code = reference_code_replay(args.reference_code, feats, args.reference_kinds, seeds)
        e2e = [] if args.skip_end_to_end else end_to_end(ref, orders, seeds, Path(tmp), args.quick,
                                                         autograd_loop=args.autograd_loop)
    against_reference_code(replay, ref_code)
    summ = summary(replay, e2e, ref, orders)
    for kind in sorted({r["kind"] for r in ref_code}):
        rows = [r for r in ref_code if r["kind"] == kind]
        summ[f"reference_code[{kind}]"] = {"mean_variance_ratio": statistics.mean(r["variance_ratio"] for r in rows),
                                           "mean_frechet": statistics.mean(r["frechet"] for r in rows),
                                           "fit_cpu_s_per_class": statistics.mean(r["fit_cpu_s"] for r in rows),
                                           "seeds": sorted({r["seed"] for r in rows})}
    if "reference" in cpu and any(r["kind"] == "vae" for r in ref_code):
        # the same classes, seeds and thread count in this process: the fit's cost ratio measured side by side
        ours = statistics.mean(cpu["reference"]) / len(feats)
        theirs = summ["reference_code[vae]"]["fit_cpu_s_per_class"]
        summ["vae_fit_cpu_s_per_class"] = {"cgil": ours, "reference_code": theirs, "cgil_cheaper_x": theirs / ours}
    command = "cgil bench fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "threads": torch.get_num_threads(), "reference": str(args.reference),
            "settings": ref["settings"], "quick": args.quick, "summary": summ, "replay_fit_cpu_s": cpu,
            "end_to_end": e2e, "reference_code": ref_code,
            "targets": {"variance_ratio": f"within +-{RATIO_TOLERANCE:.0%} of the reference's, per class",
                        "frechet": f"<= {FD_FACTOR}x the reference's, per class",
                        "end_to_end": f"mean over orders x seeds >= reference mean - {ACCURACY_MARGIN} point"}}
    name = "fidelity" + ("-quick" if args.quick else "") + ("-replay" if args.skip_end_to_end else "") + (
        "-end-to-end" if args.skip_replay else "") + (
        "-orders-" + "-".join(map(str, orders)) if args.orders is not None else "") + (
        "-with-reference-code" if args.reference_code is not None else "") + (
        "-autograd-loop" if args.autograd_loop else "")
    columns = ["objective", "class", "variance_ratio", "ratio_range", "ref_variance_ratio", "ratio_vs_ref",
               "frechet", "fd_range", "ref_frechet", "fd_vs_ref", "ratio_ok", "fd_ok"]
    if ref_code:
        columns += ["ref_code_variance_ratio", "ratio_vs_ref_code", "ref_code_frechet", "fd_vs_ref_code",
                    "ratio_ok_vs_ref_code", "fd_ok_vs_ref_code"]
    path = write_results(name, replay, meta, out_dir=args.out_dir, columns=columns)
    text = (f"# fidelity vs the reference implementation\n\nCommand: `{meta['command']}`\n\n"
            + markdown_table(replay, columns) + "\n" + markdown_table(e2e) + "\nSummary:\n\n```\n"
            + json.dumps(summ, indent=1) + "\n```\n")
    path.with_suffix(".md").write_text(f"Machine: {machine()}\n\n" + text)
    print(text)
    return {"json": str(path), "summary": summ}



# ---------------------------------------------------------------- the reference's own code, run here

def reference_module(code_dir: Path, name: str):
    """models/cgil_utils/<name>.py of a mammoth checkout, loaded from its file: these three files need only torch,
    numpy and tqdm, while importing them as `models.cgil_utils.<name>` runs mammoth's models/__init__.py, which
    changes the working directory and imports the whole framework (kornia and the rest of its requirements)."""
    import importlib.util

    path = Path(code_dir) / "models" / "cgil_utils" / f"{name}.py"
    if not path.is_file():
        raise CgilError(f"{path} does not exist: --reference-code must be a checkout of aimagelab/mammoth")
    spec = importlib.util.spec_from_file_location(f"cgil_reference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_code_replay(code_dir: Path, feats: dict[int, torch.Tensor], kinds: Sequence[str],
                          seeds: Sequence[int]) -> list[dict]:
    """Fit the reference's own generator modules (a checkout of aimagelab/mammoth, unmodified; `wandb` stubbed)
    on the same per-class features, with the constructor arguments its models/cgil_utils/cgil_utils.py uses,
    and score 1000 samples per class with the same replay_quality as cgil's. CPU time per fit."""
    import types

    import numpy as np

    from cgil.metrics import REPLAY_SAMPLES, replay_quality

    sys.modules.setdefault("wandb", types.SimpleNamespace(run=None))
    DiffusionCA = reference_module(code_dir, "diffusion").DiffusionCA
    replay = reference_module(code_dir, "generative_replay")
    Gaussian, MixtureOfGaussiansModel = replay.Gaussian, replay.MixtureOfGaussiansModel
    VariationalAutoEncoderModel = reference_module(code_dir, "vae").VariationalAutoEncoderModel

    rows = []
    for kind in kinds:
        for seed in seeds:
            torch.manual_seed(seed)
            np.random.seed(seed)
            for c, x in feats.items():
                if kind == "vae":
                    m = VariationalAutoEncoderModel(x.shape[1], 512, 256, lr=2e-4, class_idx=c, n_iters=500)
                elif kind == "mog":
                    m = MixtureOfGaussiansModel(x.shape[1], n_components=5, n_iters=500)
                elif kind == "gauss":
                    m = Gaussian(x.shape[1])
                else:
                    m = DiffusionCA(x.shape[1], "cpu", target="img", num_hidden=5, hidden_dim=256, n_iters=500,
                                    class_idx=c)
                start = time.process_time()
                m.fit(x.clone())
                cpu = time.process_time() - start
                with torch.no_grad():
                    samples = m(REPLAY_SAMPLES)
                q = replay_quality(samples.detach().numpy(), x.numpy())
                rows.append({"side": "reference code", "kind": kind, "seed": seed, "class": c, "fit_cpu_s": cpu, **q})
                log(f"reference {kind} seed {seed} class {c}: ratio {q['variance_ratio']:.3f} FD {q['frechet']:.3f}")
    return rows


if __name__ == "__main__":
    main()
