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
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from benchmarks.common import add_out_option, add_threads_option, apply_threads, log, markdown_table, write_results
from benchmarks.update_fit import (REFERENCE_PASSES, bench_generators, profile_fit,  # noqa: F401  (re-exported)
                                   synthetic_features, timed)

REFERENCE_EPOCHS = 60  # alignment epochs of most reference presets
TEXT_MODELS = {64: "cgil-tiny", 512: "ViT-B-16", 768: "ViT-L-14"}


# ---------------------------------------------------------------- synthetic data and text towers

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

    from cgil.clip import FrozenClip, ModelIdentity  # (importing cgil.clip registers cgil-tiny with open_clip)

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


# ---------------------------------------------------------------- CLI

def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cgil bench update", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke run, not a measurement")
    p.add_argument("--full", action="store_true", help="also time the full 77-token path up to 50 seen classes")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="embedding widths (64: cgil-tiny, 512: ViT-B-16, 768: ViT-L-14)")
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
    p.add_argument("--whole-run", action="store_true",
                   help="also time one whole CGIL run at the reference fixture's settings in a child process: CPU "
                        "split into fit, alignment and fixed costs, against the fixture's reference CPU time")
    p.add_argument("--reference", type=Path, default=None,
                   help="the reference fixture for --whole-run (default: cgil bench fidelity's)")
    p.add_argument("--seed", type=int, default=0)
    add_threads_option(p)
    add_out_option(p)
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
        from benchmarks.update_fit import fit_speed_vs_reference

        vs_reference = fit_speed_vs_reference(passes=ref_passes, repeats=args.repeats or (1 if quick else 2))
        log(f"  VAE fit vs reference-style loop (digits task: D=64, 2 classes x 124): CPU "
            f"x{vs_reference['speedup_cpu_x']:.2f}, {vs_reference['cgil_pct_of_gemm_peak']:.0f}% of GEMM peak; "
            f"{vs_reference['cgil_ms_per_class_iteration']:.2f} ms per class-iteration = "
            f"x{vs_reference['cgil_vs_matmul_floor_hot_x']:.2f} the hot matmul floor, "
            f"x{vs_reference['cgil_vs_matmul_floor_in_step_x']:.2f} the in-step one")
    run_split: dict = {}
    if args.whole_run:
        from benchmarks.fidelity import DEFAULT_REFERENCE
        from benchmarks.update_run import whole_run

        log("whole run at the reference fixture's settings (child process)")
        run_split = whole_run(args.reference or DEFAULT_REFERENCE, threads=args.threads or 1, quick=quick)
        log(f"  whole run: {run_split['total_cpu_s']:.1f} CPU-s (fit {run_split['fit_cpu_s']:.1f}, alignment "
            f"{run_split['align_cpu_s']:.1f}, fixed {run_split['fixed_cpu_s']:.1f}); reference "
            f"{run_split['reference_cpu_s_low']:.0f}-{run_split['reference_cpu_s_high']:.0f}: "
            f"x{run_split['cheaper_than_reference_x_low']:.2f}-{run_split['cheaper_than_reference_x_high']:.2f} cheaper")
    align_rows = []
    if not args.skip_align:
        if quick:  # the smoke run uses our tiny text tower instead of ViT-B-16
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
            "VAE fit vs reference-style loop: cgil_cpu_s is cgil's default CPU fit (the hand-written step, "
            "cgil/generators/vae_cpu.py), cgil_autograd_loop_cpu_s the batched autograd loop it equals bit for bit "
            "(vae_cpu_step=False, what GPUs run); matmul_floor_hot = the 17 products of one class step each "
            "repeated on its own operands (weights stay in cache), matmul_floor_in_step = the 17 in a step's order "
            "over one class's distinct weights (what any fit pays); both CPU time, minimum of repeats, measured "
            "beside the fits; gemm_peak_gflops is this "
            "process's one-thread fp32 GEMM rate at 64x512x512, and gemm_only_ceiling_x = reference-style CPU time "
            "/ (the fit's GEMM FLOPs at that peak): the most any fp32 fit of this model could gain, with all other "
            "work (Adam, BatchNorm, activations, Python) at zero",
            "GPU: not measured",
            "times are the minimum over interleaved repeats; *_cpu_s = this process's CPU time, *_s = wall clock. "
            "With --threads 1 CPU time is the work done and is robust to other processes sharing the cores (see "
            "load_average in meta); wall time is inflated by whatever else runs",
        ],
        "profile_batched_vae_fit": profile,
        "vae_fit_vs_reference_style": vs_reference,
        "whole_run": run_split,
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
    if run_split:
        md += ["## Whole run at the reference fixture's settings (one child process, CPU seconds; the reference's "
               "figure is the fixture's cpu_seconds_note)", "", markdown_table([run_split])]
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
