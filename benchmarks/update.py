"""`cgil bench update`: the cost of one task update as the number of seen classes grows.

No dataset is needed: class features are synthetic (a random centre per class plus noise) with
D = 512 (ViT-B-16's embedding width) and D = 768 (ViT-L-14's). Three measurements, all through the
library's own code paths:

1. Generator fitting of one task's new classes (20 by default), per generator kind, batched
   (`make_generators(cfg, classes, D).fit`) against one class at a time through the same code
   (`make_generators(cfg, [c], D).fit`, K times), plus the largest per-class parameter difference
   between the two (a class trained in a batch must equal the class trained alone).
2. Alignment (`Learner.align`) cost per optimisation step with C = 10, 50, 100, 200 seen classes,
   on the text tower of ViT-B-16 (D = 512) and ViT-L-14 (D = 768) with random weights (the cost does
   not depend on the weights). Every step recomputes the keys of all C seen classes.
3. Truncated text path (up to the longest EOT) against the full 77-token context: step time and
   the largest absolute difference between the two sets of keys.

Budgets are reduced so that the benchmark finishes in minutes on a laptop CPU: the generators are
fitted for `--passes` passes (the reference runs 500) and alignment is timed per step. Full-budget
times are *extrapolated* linearly (time per iteration x iterations of the reference budget) and
every such column says so in its name.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from benchmarks.common import add_threads_option, apply_threads, log, markdown_table, write_results

REFERENCE_PASSES = 500
REFERENCE_EPOCHS = 60  # alignment epochs of most reference presets
TEXT_MODELS = {512: "ViT-B-16", 768: "ViT-L-14"}


# ---------------------------------------------------------------- synthetic data and text towers

def synthetic_features(num_classes: int, n: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 1, dim, generator=g)
    return list(centres + 0.3 * torch.randn(num_classes, n, dim, generator=g))


def class_names(count: int, tokenizer=None) -> list[str]:
    """Real class names of realistic length (ImageNet's first `count`), the longest first so that every
    prefix of the list has the truncated length of the whole list (a conservative text-path ratio)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = [IMAGENET_CLASSNAMES[i % len(IMAGENET_CLASSNAMES)] for i in range(count)]
    if tokenizer is not None and names:
        lengths = [len(tokenizer.encode(n)) if hasattr(tokenizer, "encode") else len(n.split()) for n in names]
        longest = max(range(len(names)), key=lambda i: lengths[i])
        names.insert(0, names.pop(longest))
    return names


class _TextOnly(nn.Module):
    """An open_clip text tower and a logit scale: all `Learner.align` touches of a CLIP model."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def text_only_clip(model: str, seed: int = 0):
    """FrozenClip over the text tower of `model` with seeded random weights (no image tower built)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, _build_text_tower

    from cgil.clip import FrozenClip, ModelIdentity

    cfg = open_clip.get_model_config(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = _build_text_tower(cfg["embed_dim"], CLIPTextCfg(**cfg["text_cfg"]),
                                 quick_gelu=cfg.get("quick_gelu", False))
    wrapper = _TextOnly(text).eval().requires_grad_(False)
    identity = ModelIdentity(model=model, pretrained=None, weights_id=f"random:seed={seed}",
                             config_sha="text-tower-only", embed_dim=int(cfg["embed_dim"]), image_size=0,
                             context_length=int(cfg["text_cfg"].get("context_length", 77)))
    return FrozenClip(wrapper, None, open_clip.get_tokenizer(model), identity, torch.device("cpu"))


# ---------------------------------------------------------------- 1. generator fitting

def _fit_once(kind: str, class_ids: Sequence[int], feats: Sequence[torch.Tensor], dim: int, passes: int,
              em_steps: int, seed: int):
    from cgil.generators import GeneratorConfig, make_generators

    cfg = GeneratorConfig(kind=kind, passes=passes, em_steps=em_steps, em_tol=0.0)
    gen = make_generators(cfg, class_ids, dim)
    stats = gen.fit(list(feats), seed=seed)
    return gen, stats


def timed(fn) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process). CPU time is robust to other processes
    sharing the cores; wall time is what a user waits."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def _max_class_diff(batched, singles: Sequence) -> float:
    """Largest |difference| between class k's tensors in the batched store and class k fitted alone."""
    worst = 0.0
    state = batched.state_dict()
    for k, single in enumerate(singles):
        for name, v in single.state_dict().items():
            b = state[name]
            if b.ndim == 0 or b.shape[0] != batched.num_classes or name == "alpha_bar":
                continue  # shared buffers (e.g. the diffusion schedule)
            worst = max(worst, float((b[k:k + 1] - v).abs().max()))
    return worst


def bench_generators(kinds: Sequence[str], dims: Sequence[int], classes: int, n: int, passes: int,
                     em_steps: int, seed: int, log, repeats: int = 3) -> list[dict[str, Any]]:
    from cgil.generators import GeneratorConfig, make_generators

    rows = []
    for dim in dims:
        feats = synthetic_features(classes, n, dim, seed)
        ids = list(range(classes))
        for kind in kinds:
            _fit_once(kind, ids[:2], feats[:2], dim, 1, 2, seed)  # warm-up (allocator, kernels)
            budgets = [passes, 2 * passes] if kind in ("vae", "diffusion") else [passes]
            ems = [em_steps, 2 * em_steps] if kind == "mog" else [em_steps]
            points = list(zip(budgets, ems)) if len(budgets) == len(ems) else (
                [(p, em_steps) for p in budgets] if len(budgets) > 1 else [(passes, e) for e in ems])
            measured = []  # per budget point: (units, batched wall, alone wall, batched cpu, alone cpu)
            for p_, e_ in points:
                walls = {"batched": [], "alone": []}
                cpus = {"batched": [], "alone": []}
                for _ in range(repeats):  # interleaved, so both see the same load on a shared machine
                    (batched, stats), w, c = timed(lambda: _fit_once(kind, ids, feats, dim, p_, e_, seed))
                    walls["batched"].append(w)
                    cpus["batched"].append(c)
                    singles, w, c = timed(lambda: [_fit_once(kind, [i], [feats[i]], dim, p_, e_, seed)[0]
                                                   for i in ids])
                    walls["alone"].append(w)
                    cpus["alone"].append(c)
                if kind in ("vae", "diffusion"):
                    per_class = make_generators(GeneratorConfig(kind=kind, passes=p_), ids, dim).iterations([n] * classes)
                    units = max(per_class) if isinstance(per_class, (list, tuple)) else int(per_class)
                elif kind == "mog":
                    units = e_
                else:
                    units = 1
                measured.append((units, min(walls["batched"]), min(walls["alone"]), min(cpus["batched"]),
                                 min(cpus["alone"])))
            iters, t_batched, t_single, c_batched, c_single = measured[0]
            if kind in ("vae", "diffusion"):
                unit = "iteration"
                full_units = REFERENCE_PASSES * max(1, math.ceil(n / GeneratorConfig().batch_size))
            elif kind == "mog":
                unit, full_units = "EM step", 500
            else:
                unit, full_units = "fit", 1

            def extrapolate(col: int) -> float:
                """Fixed + per-unit CPU time fitted on the two budgets, evaluated at the reference budget."""
                if len(measured) < 2:
                    return measured[0][col] / measured[0][0] * full_units
                (u1, *a), (u2, *b) = measured[0], measured[1]
                per_unit = max(0.0, (b[col - 1] - a[col - 1]) / (u2 - u1))
                fixed = max(0.0, a[col - 1] - per_unit * u1)
                return fixed + per_unit * full_units

            ext_b, ext_a = extrapolate(3), extrapolate(4)  # CPU-time columns: robust to a shared machine
            row = {
                "D": dim, "generator": kind, "classes": classes, "n_per_class": n,
                "budget": " + ".join(f"{m[0]}" for m in measured) + f" {unit}s",
                "batched_cpu_s": c_batched, "one_at_a_time_cpu_s": c_single, "speedup_cpu_x": c_single / c_batched,
                "batched_s": t_batched, "one_at_a_time_s": t_single, "speedup_x": t_single / t_batched,
                "reference_budget": f"{full_units} {unit}s",
                "extrapolated_batched_cpu_s_at_reference": ext_b,
                "extrapolated_one_at_a_time_cpu_s_at_reference": ext_a,
                "extrapolated_speedup_x_at_reference": ext_a / ext_b if ext_b > 0 else None,
                "max_abs_diff_batched_vs_alone": _max_class_diff(batched, singles),
            }
            if len(measured) > 1:
                row["second_budget"] = {"units": measured[1][0], "batched_s": measured[1][1],
                                        "one_at_a_time_s": measured[1][2], "batched_cpu_s": measured[1][3],
                                        "one_at_a_time_cpu_s": measured[1][4]}
            rows.append(row)
            log(f"  fit D={dim} {kind:9s} batched {t_batched:7.2f}s  one-at-a-time {t_single:7.2f}s  "
                f"x{row['speedup_x']:.2f} (CPU time x{row['speedup_cpu_x']:.2f})  diff {row['max_abs_diff_batched_vs_alone']:.2e}")
    return rows


# ---------------------------------------------------------------- 2./3. alignment and text path

def bench_alignment(dims: Sequence[int], seen: Sequence[int], full_text_max_classes: int, repeats: int, seed: int,
                    log) -> list[dict[str, Any]]:
    from cgil.generators import GeneratorConfig, make_generators
    from cgil.learner import AlignConfig, Learner

    rows = []
    for dim in dims:
        model = TEXT_MODELS.get(dim)
        if model is None:
            raise SystemExit(f"no text tower registered for D={dim}; choose from {sorted(TEXT_MODELS)}")
        clip = text_only_clip(model, seed)
        names = class_names(max(seen), clip.tokenizer)
        warm = False
        for count in seen:
            learner = Learner(clip, GeneratorConfig(), AlignConfig(epochs=1, batch_size=128))
            learner.add_classes(list(range(count)), names[:count], seed)
            g = torch.Generator().manual_seed(seed)
            feats = torch.randn(learner.align_cfg.batch_size, dim, generator=g)
            ids = torch.randint(0, count, (learner.align_cfg.batch_size,), generator=g)
            source = Learner.real_source(feats, ids)  # exactly one optimisation step per align() call
            length = int(learner.text.eot_positions(learner.prompts.tokens).max()) + 1

            def step(truncate: bool) -> tuple[float, float]:
                learner.text.truncate = truncate
                _, wall, cpu = timed(lambda: learner.align(source, seed=seed))
                return wall, cpu

            with_full = count <= full_text_max_classes
            if not warm:  # one warm-up step per tower (allocator, kernels)
                step(True)
                warm = True
            trunc, full = [], []
            for _ in range(repeats):  # interleaved, so both paths see the same load
                trunc.append(step(True))
                if with_full:
                    full.append(step(False))
            t_trunc, c_trunc = min(w for w, _ in trunc), min(c for _, c in trunc)
            t_full = min(w for w, _ in full) if full else None
            c_full = min(c for _, c in full) if full else None
            diff = None
            if with_full:
                with torch.no_grad():
                    learner.text.truncate = True
                    k_trunc = learner.prompts.keys()
                    learner.text.truncate = False
                    k_full = learner.prompts.keys()
                diff = float((k_trunc - k_full).abs().max())
            learner.text.truncate = True
            # Replay sampling per epoch: S = 256 samples from the VAE of every seen class (groups of 20).
            for start in range(0, count, 20):
                group = make_generators(GeneratorConfig(), list(range(start, min(count, start + 20))), dim)
                group.build_empty()
                learner.store.append(group)
            _, t_sample, _ = timed(lambda: learner.replay_source()(torch.Generator().manual_seed(seed)))
            steps = math.ceil(count * learner.align_cfg.samples_per_class / learner.align_cfg.batch_size)
            row = {
                "D": dim, "text tower": model, "seen_classes": count, "tokens_truncated": length,
                "step_s_truncated": t_trunc, "step_s_full77": t_full,
                "speedup_x": (t_full / t_trunc) if t_full else None,
                "step_cpu_s_truncated": c_trunc, "step_cpu_s_full77": c_full,
                "speedup_cpu_x": (c_full / c_trunc) if c_full else None,
                "max_abs_key_diff": diff, "vae_replay_sample_s_per_epoch": t_sample, "steps_per_epoch": steps,
                "extrapolated_update_cpu_s_60_epochs_truncated": REFERENCE_EPOCHS * (steps * c_trunc + t_sample),
            }
            rows.append(row)
            full_txt = "not measured" if t_full is None else (
                f"{t_full:.2f}s x{row['speedup_x']:.2f} (CPU time x{row['speedup_cpu_x']:.2f}) key diff {diff:.1e}")
            log(f"  align D={dim} C={count:4d} L={length}: step truncated {t_trunc:.2f}s, full-77 {full_txt}")
    return rows


def profile_fit(kind: str, dim: int, classes: int, n: int, passes: int, seed: int, top: int = 8) -> dict:
    """Where the time of one batched fit goes: Python-level phases (cProfile) and operators (torch.profiler)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    feats = synthetic_features(classes, n, dim, seed)
    _fit_once(kind, list(range(classes)), feats, dim, 1, 2, seed)  # warm-up
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(_fit_once, kind, list(range(classes)), feats, dim, passes, 10, seed)
    total = time.perf_counter() - start
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}

    def cum(pred) -> float:
        return sum(v[3] for k, v in stats.items() if pred(k))

    phases = {
        "optimizer step": cum(lambda k: k[2] == "step" and ("generators" in k[0] or "optim" in k[0])),
        "backward (autograd)": cum(lambda k: k[2] == "backward" and k[0].endswith("_tensor.py")),
        "forward layers": cum(lambda k: k[2] == "forward" and "generators" in k[0]),
    }
    phases["other (init, sampling noise, indices, loss)"] = max(0.0, total - sum(phases.values()))
    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        _fit_once(kind, list(range(classes)), feats, dim, passes, 10, seed)
    events = sorted(tprof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    op_total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {
        "setting": {"kind": kind, "D": dim, "classes": classes, "n_per_class": n, "passes": passes},
        "total_s": total,
        "phases": [{"phase": k, "seconds": v, "share": v / total} for k, v in phases.items()],
        "ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000.0, "share": e.self_cpu_time_total / op_total,
                 "calls": e.count} for e in events[:top]],
    }


# ---------------------------------------------------------------- CLI

def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cgil bench update", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke run, not a measurement")
    p.add_argument("--full", action="store_true", help="also time the full 77-token path up to 50 seen classes")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="embedding widths (512 and/or 768)")
    p.add_argument("--seen", type=int, nargs="+", default=None, help="seen-class counts for the alignment step")
    p.add_argument("--classes-per-task", type=int, default=None, help="new classes fitted per task (default 20)")
    p.add_argument("--n-per-class", type=int, default=None, help="training features per class (default 100)")
    p.add_argument("--passes", type=int, default=None, help="VAE/diffusion passes timed, and twice that (default 2; reference 500)")
    p.add_argument("--em-steps", type=int, default=None, help="MoG EM steps timed (default 10; reference up to 500)")
    p.add_argument("--generators", nargs="+", default=["vae", "mog", "gauss", "diffusion"])
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timed runs per point, minimum reported (default 2; quick 1)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown of a VAE fit")
    p.add_argument("--skip-align", action="store_true", help="generator fitting only")
    p.add_argument("--reference-passes", type=int, default=None,
                   help="passes of the side-by-side VAE fit vs a reference-style loop (default 20; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    add_threads_option(p)
    p.add_argument("--out-dir", type=Path, default=None, help="where results go (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    apply_threads(args.threads)
    quick = args.quick
    dims = args.dims or ([512] if quick else [512, 768])
    seen = args.seen or ([3] if quick else [10, 50, 100, 200])
    k = args.classes_per_task or (3 if quick else 20)
    n = args.n_per_class or (8 if quick else 100)
    passes = args.passes or (1 if quick else 2)
    em_steps = args.em_steps or (2 if quick else 10)
    full_max = max(seen) if quick else (50 if args.full else 10)
    torch.manual_seed(args.seed)

    log(f"generator fitting: {k} new classes x {n} features, passes={passes}, em_steps={em_steps}")
    import os

    load_before = os.getloadavg()
    fit_rows = bench_generators(args.generators, dims, k, n, passes, em_steps, args.seed, log,
                                repeats=args.repeats or (1 if quick else 2))
    profile: dict = {}
    if not args.no_profile and "vae" in args.generators:
        profile = profile_fit("vae", max(dims), k, n, 1 if quick else 2, args.seed)
        log("  profile of a batched VAE fit: " + ", ".join(
            f"{p['phase']} {100 * p['share']:.0f}%" for p in profile["phases"]))
    vs_reference: dict = {}
    ref_passes = args.reference_passes if args.reference_passes is not None else (1 if quick else 20)
    if ref_passes and "vae" in args.generators:
        from benchmarks.fidelity import fit_speed_vs_reference

        vs_reference = fit_speed_vs_reference(passes=ref_passes, repeats=args.repeats or (1 if quick else 2))
        log(f"  VAE fit vs reference-style loop (digits task: D=64, 2 classes x 124): CPU "
            f"x{vs_reference['speedup_cpu_x']:.2f}, {vs_reference['cgil_pct_of_gemm_peak']:.0f}% of GEMM peak")
    align_rows = []
    if not args.skip_align:
        if quick:  # the smoke run uses our tiny text tower instead of ViT-B-16
            TEXT_MODELS.setdefault(64, "cgil-tiny")
            import cgil.clip  # noqa: F401  (registers cgil-tiny with open_clip)
            dims_align = [64]
        else:
            dims_align = dims
        log(f"alignment step: seen classes {seen}, full 77-token path up to {full_max} classes")
        align_rows = bench_alignment(dims_align, seen, full_max, args.repeats or (1 if quick else 2), args.seed, log)

    command = "cgil bench update " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command.strip(),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "torch": torch.__version__,
        "settings": {"dims": dims, "seen": seen, "classes_per_task": k, "n_per_class": n, "passes": passes,
                     "em_steps": em_steps, "full_text_max_classes": full_max, "repeats": args.repeats},
        "notes": [
            f"fitting timed at {passes} and {2 * passes} passes (VAE/diffusion), {em_steps} and {2 * em_steps} EM "
            f"steps (MoG, no early stop); speedup_x is at the first budget; 'extrapolated' columns fit fixed + "
            f"per-iteration cost on the two budgets and evaluate it at the reference budget ({REFERENCE_PASSES} "
            f"passes, 500 EM steps): they are not measurements",
            "alignment timed per optimisation step (keys of all seen classes, backward, AdamW); "
            f"'extrapolated_update_cpu_s' = {REFERENCE_EPOCHS} epochs x (steps/epoch x step CPU time + replay "
            "sampling): not a measurement",
            "full 77-token path timed only up to full_text_max_classes seen classes (too slow beyond on this "
            "machine); empty cells are not measured",
            "GPU: not measured",
            "times are the minimum over interleaved repeats; *_cpu_s = this process's CPU time, *_s = wall clock. "
            "With --threads 1 CPU time is the work done and is robust to other processes sharing the cores (see "
            "load_average in meta); wall time is inflated by whatever else runs",
        ],
        "profile_batched_vae_fit": profile,
        "vae_fit_vs_reference_style": vs_reference,
        "fit": fit_rows,
        "align": align_rows,
    }
    rows = [{"part": "fit", **r} for r in fit_rows] + [{"part": "align", **r} for r in align_rows]
    path = write_results("update", rows, meta, out_dir=args.out_dir)
    md = ["# update: one task update", "", f"Command: `{meta['command']}`", ""]
    fit_table = [{k: v for k, v in r.items() if k != "second_budget"} for r in fit_rows]
    md += ["## Generator fitting, batched vs one class at a time", "", markdown_table(fit_table)]
    if vs_reference:
        md += ["## VAE fit of one digits task: cgil vs a reference-style loop (torch.optim.Adam, DataLoader of 64, "
               "scheduler per pass), same process, CPU time", "", markdown_table([vs_reference])]
    if align_rows:
        md += ["## Alignment step, truncated vs full 77-token text path", "", markdown_table(align_rows)]
    if profile:
        md += [f"## Where a batched VAE fit spends its time ({profile['setting']}, {profile['total_s']:.2f} s)", "",
               markdown_table(profile["phases"]), "", "Top operators (torch.profiler, self CPU time):", "",
               markdown_table(profile["ops"])]
    md += ["Notes:", ""] + [f"- {x}" for x in meta["notes"]]
    text = "\n".join(md) + "\n"
    from benchmarks.common import machine

    path.with_suffix(".md").write_text(f"Machine: {machine()}\n\n" + text)
    print(text)
    return {"json": str(path), "fit": fit_rows, "align": align_rows}


if __name__ == "__main__":
    main()
