"""The `update` step of `cgil bench gpu`: a CUDA task update, batched generators against a per-class loop."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

UPDATE_SPEEDUP = 10.0  # target: batched generator fitting this many times faster than the per-class loop


def _count_host_syncs(ctx, learner: Any, fit: Callable[[], Any]) -> None:
    """Host/GPU synchronisations per alignment step and per generator fit (torch's sync debug mode):
    each one stalls the Python thread until the GPU has caught up."""
    import math
    import warnings

    import torch

    from cgil.learner import AlignConfig

    counts = {}
    learner.align_cfg = AlignConfig(epochs=1)
    steps = math.ceil(learner.prompts.num_classes * learner.align_cfg.samples_per_class / learner.align_cfg.batch_size)
    for name, fn, per in (("alignment step", lambda: learner.align(learner.replay_source(), seed=4), steps),
                          ("batched VAE fit of 5 passes", fit, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchronizing" in str(w.message) for w in caught) / per
    for name, n in counts.items():
        ctx.add(1, "update", f"host syncs per {name}", "ok", note=f"{n:.1f} (torch.cuda sync debug mode)")


def setup_update(ctx) -> dict[str, Any]:
    """Synthetic features (CPU) and the text tower the alignment runs on, checked for the right width."""
    import torch

    from cgil.generators import GeneratorConfig

    from .update import class_names, synthetic_features, text_only_clip

    classes, dim, n, passes, epochs, text_model = (3, 64, 10, 2, 1, "cgil-tiny") if ctx.quick else \
        (20, 512, 100, 500, 60, "ViT-B-16")
    feats = synthetic_features(classes, n + 50, dim, seed=0)
    embed_dim = text_only_clip(text_model).identity.embed_dim
    if embed_dim != dim:
        raise RuntimeError(f"{text_model} embeds in {embed_dim} dimensions, not {dim}")
    return {"classes": classes, "dim": dim, "passes": passes, "epochs": epochs, "text_model": text_model,
            "train": [f[:n] for f in feats], "test": torch.cat([f[n:] for f in feats]),
            "labels": torch.arange(classes).repeat_interleave(50), "names": class_names(classes),
            "gen_cfg": GeneratorConfig(kind="vae", passes=passes),
            "summary": f"{classes} classes of D = {dim}, {text_model} text tower"}


def run_update(ctx, state: dict[str, Any]) -> None:
    """Batched and per-class generator fits, timed in interleaved ABBA order (batched, per-class,
    per-class, batched) so that clock boost, cache warmth or a neighbour's load drifting over the step
    lands on both; each mode reports its median."""
    import torch

    from cgil.generators import GeneratorConfig, make_generators
    from cgil.learner import AlignConfig, Learner
    from cgil.text import normalize

    from .update import text_only_clip

    classes, dim, passes, epochs = state["classes"], state["dim"], state["passes"], state["epochs"]
    ids, gen_cfg = list(range(classes)), state["gen_cfg"]
    train = [f.to(ctx.device) for f in state["train"]]

    def fit(group_ids: list[int], group_feats: list) -> Any:
        gen = make_generators(gen_cfg, group_ids, dim)
        gen.fit(group_feats, seed=1)
        return gen

    runs: dict[str, list[dict[str, float]]] = {"batched": [], "per-class loop": []}
    learner = None
    for mode in ("batched", "per-class loop", "per-class loop", "batched"):
        ctx.sync()
        t0 = time.perf_counter()
        store = [fit(ids, train)] if mode == "batched" else [fit([c], [train[c]]) for c in ids]
        ctx.sync()
        fit_s = time.perf_counter() - t0
        clip = text_only_clip(state["text_model"])
        clip.model.to(ctx.device)
        clip.device = torch.device(ctx.device)
        learner = Learner(clip, gen_cfg, AlignConfig(epochs=epochs))
        learner.add_classes(ids, state["names"], seed=2)
        learner.store = store
        t0 = time.perf_counter()
        learner.align(learner.replay_source(), seed=3)
        ctx.sync()
        align_s = time.perf_counter() - t0
        pred = (normalize(state["test"].to(ctx.device)) @ learner.head().t()).argmax(1).cpu()
        runs[mode].append({"fit_s": fit_s, "align_s": align_s,
                           "accuracy": 100.0 * float((pred == state["labels"]).float().mean())})
    if ctx.cuda:
        small = GeneratorConfig(kind="vae", passes=5)  # syncs per fit at 5 passes: enough to see a per-step sync
        _count_host_syncs(ctx, learner, lambda: make_generators(small, ids, dim).fit(train, seed=1))
    results = {mode: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for mode, rs in runs.items()}
    b, s = results["batched"], results["per-class loop"]
    speedup = s["fit_s"] / b["fit_s"]
    for mode, r in results.items():
        ctx.add(1, "update", f"{mode}: fit {classes} VAE x{passes} passes", "ok", seconds=r["fit_s"], accuracy=r["accuracy"],
                note=f"median of 2 (interleaved); alignment {epochs} epochs on the {state['text_model']} text tower: "
                     f"{r['align_s']:.2f} s")
    same = abs(b["accuracy"] - s["accuracy"]) <= 1.0
    ctx.add(1, "update", "batched vs per-class loop", "ok" if speedup >= UPDATE_SPEEDUP and same else
            "below target", speedup_x=speedup, accuracy=b["accuracy"] - s["accuracy"],
            target=f">= {UPDATE_SPEEDUP:.0f}x generator fitting, accuracy within 1 point",
            note=f"whole update (fit + align): {(s['fit_s'] + s['align_s']) / (b['fit_s'] + b['align_s']):.2f}x; "
                 "accuracy column: batched minus per-class, points")
