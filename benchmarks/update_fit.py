"""Generator fitting for `cgil bench update`: one task's classes batched against one at a time, a profile,
and cgil's VAE fit against a loop in the reference code's style (CPU time, same process).

Split from benchmarks/update.py (which runs them): the synthetic features, the fit helpers and the
measurements described there.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

REFERENCE_PASSES = 500


def synthetic_features(num_classes: int, n: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 1, dim, generator=g)
    return list(centres + 0.3 * torch.randn(num_classes, n, dim, generator=g))


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

    phases = {  # the CPU VAE runs the hand-written step; the other families (and GPUs) the autograd loop
        # the hand-written step runs each layer's Adam inside its backward: counted once, as the optimizer
        "forward + backward, hand-written": cum(lambda k: k[2] == "gradients" and k[0].endswith("vae_cpu.py"))
        - cum(lambda k: k[2] == "_update" and k[0].endswith("vae_cpu.py")),
        "optimizer step": cum(lambda k: "_fused_adam" in k[2] or (
            k[2] == "step" and "optim" in k[0]) or (k[2] == "step" and k[0].endswith("layers.py"))),
        "backward (autograd)": cum(lambda k: k[2] == "backward" and k[0].endswith("_tensor.py")),
        "forward layers (autograd)": cum(lambda k: k[2] == "forward" and "generators" in k[0]),
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


# ---------------------------------------------------------------- speed: cgil's fit vs a reference-style loop

def reference_style_vae_fit(x: torch.Tensor, passes: int, lr: float = 2e-4, hidden: int = 512, latent: int = 256,
                            batch: int = 64) -> None:
    """One class's VAE fitted the way the reference code does it (our own code, the reference's structure):
    nn.Sequential encoder/decoder, torch.optim.Adam, a shuffled DataLoader of batches of 64 (last one partial,
    batches of one skipped), CosineAnnealingWarmRestarts stepped once per pass. For timing only."""
    from torch import nn

    d = x.shape[1]
    enc = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2, inplace=True),
                        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2, inplace=True),
                        nn.Linear(hidden, 2 * latent))
    dec = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, hidden),
                        nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, d))
    lo, hi = x.min(0).values, x.max(0).values
    u = (x - lo) / (hi - lo)
    u = (u - u.mean(0)) / u.std(0)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, passes // 10), T_mult=2)
    loader = torch.utils.data.DataLoader(u, batch_size=batch, shuffle=True)
    for _ in range(passes):
        for xb in loader:
            if len(xb) == 1:
                continue
            opt.zero_grad()
            mu, s = enc(xb).chunk(2, dim=-1)
            out = dec(mu + torch.randn_like(mu) * torch.exp(s))
            nll = torch.nn.functional.gaussian_nll_loss(out, xb, torch.ones_like(out), full=True, reduction="sum")
            loss = (nll + 0.5 * torch.sum(torch.exp(s) + mu ** 2 - 1.0 - s)) / len(xb)
            loss.backward()
            opt.step()
        sched.step()


def gemm_rate(m: int = 64, k: int = 512, n: int = 512, seconds: float = 0.5) -> float:
    """This process's one-thread fp32 GEMM rate (GFLOP/s, CPU time) at the VAE's largest layer shape."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(20):
        a @ b
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.process_time() - start) / 1e9


def vae_flops_per_iteration(d: int, hidden: int = 512, latent: int = 256, batch: int = 64) -> float:
    """Multiply-add FLOPs of one VAE training step of one class: forward 2*B*sum(in*out), backward twice
    that, less the input gradient of the first layer (the data need none)."""
    shapes = [(d, hidden), (hidden, hidden), (hidden, 2 * latent), (latent, hidden), (hidden, hidden), (hidden, d)]
    fwd = 2 * batch * sum(i * o for i, o in shapes)
    return 3 * fwd - 2 * batch * d * hidden


def matmul_floor_seconds(d: int, hidden: int = 512, latent: int = 256, batch: int = 64,
                         repeats: int = 5) -> dict[str, float]:
    """CPU seconds of the 17 matrix products of one class's VAE step at the fit's shapes (6 forward, 6 weight
    gradients, 5 input gradients; the data need no gradient), two ways, minimum over `repeats`:
    - "hot": each product repeated on its own operands, so its weight stays in cache: what the GEMMs
      cost if memory were free (the floor issue 19 quotes);
    - "in_step": the 17 in a step's order over one class's distinct weights and gradient buffers, so each
      reads its ~1 MB weight from wherever the step before left it: what any fit of this model pays."""
    shapes = [(d, hidden), (hidden, hidden), (hidden, 2 * latent), (latent, hidden), (hidden, hidden), (hidden, d)]
    weights = [torch.randn(i, o) * 0.05 for i, o in shapes]
    grads = [torch.empty(i, o) for i, o in shapes]
    inputs = [torch.randn(batch, i) for i, _ in shapes]
    outs = [torch.randn(batch, o) for _, o in shapes]
    products = []
    for j, (w, gw, x, g) in enumerate(zip(weights, grads, inputs, outs)):
        products.append(lambda x=x, w=w: torch.mm(x, w))
        products.append(lambda x=x, g=g, gw=gw: torch.mm(x.t(), g, out=gw))
        if j:
            products.append(lambda g=g, w=w: torch.mm(g, w.t()))
    assert len(products) == 17

    def best(fn, count: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(count):
                fn()
            times.append((time.process_time() - start) / count)
        return min(times)

    hot = sum(best(p, 50) for p in products)
    in_step = best(lambda: [p() for p in products], 30)
    return {"hot": hot, "in_step": in_step}


def fit_speed_vs_reference(dim: int = 64, classes: int = 2, n: int = 124, passes: int = 20, repeats: int = 2,
                           seed: int = 0) -> dict[str, Any]:
    """One task's VAE fits, CPU time, interleaved in this process at the same settings (n features per class,
    batches of 64, `passes` passes): cgil's default CPU fit (the hand-written step, `vae_cpu_step`), the
    batched autograd loop it equals bit for bit (what GPUs run) and the reference-style loop over classes;
    beside them the matmul floor of the same steps (`matmul_floor_seconds`)."""
    from dataclasses import replace

    from cgil.generators import GeneratorConfig, make_generators

    feats = synthetic_features(classes, n, dim, seed)
    cfg = GeneratorConfig(kind="vae", passes=passes)
    variants = {"default": cfg, "autograd": replace(cfg, vae_cpu_step=False)}
    times: dict[str, list[float]] = {"default": [], "autograd": [], "reference": []}
    for variant in variants.values():  # warm-up, both paths
        make_generators(replace(variant, passes=1), [0], dim).fit(feats[:1], seed=seed)
    floors = []
    for _ in range(repeats):  # interleaved, so all see the same load
        for name, variant in variants.items():
            torch.manual_seed(seed)
            start = time.process_time()
            make_generators(variant, list(range(classes)), dim).fit(feats, seed=seed)
            times[name].append(time.process_time() - start)
        start = time.process_time()
        for f in feats:
            reference_style_vae_fit(f, passes)
        times["reference"].append(time.process_time() - start)
        floors.append(matmul_floor_seconds(dim, repeats=2))
    peak = gemm_rate()
    iters = passes * -(-n // 64)
    steps = iters * classes  # class-iterations
    flops = vae_flops_per_iteration(dim) * steps
    best = {k: min(v) for k, v in times.items()}
    floor = {k: min(f[k] for f in floors) for k in ("hot", "in_step")}
    adam = adam_seconds(vae_parameter_count(dim)) * steps
    return {"D": dim, "classes": classes, "n_per_class": n, "passes": passes, "iterations_per_class": iters,
            "cgil_cpu_s": best["default"], "cgil_autograd_loop_cpu_s": best["autograd"],
            "reference_style_cpu_s": best["reference"], "speedup_cpu_x": best["reference"] / best["default"],
            "autograd_loop_speedup_cpu_x": best["reference"] / best["autograd"],
            "cgil_ms_per_class_iteration": 1e3 * best["default"] / steps,
            "matmul_floor_hot_ms_per_class_iteration": 1e3 * floor["hot"],
            "matmul_floor_in_step_ms_per_class_iteration": 1e3 * floor["in_step"],
            "cgil_vs_matmul_floor_hot_x": best["default"] / steps / floor["hot"],
            "cgil_vs_matmul_floor_in_step_x": best["default"] / steps / floor["in_step"],
            "gemm_peak_gflops": peak,
            "cgil_pct_of_gemm_peak": 100 * flops / best["default"] / 1e9 / peak,
            "reference_style_pct_of_gemm_peak": 100 * flops / best["reference"] / 1e9 / peak,
            # the most any fp32 fit of this model could gain: its GEMMs alone, at the measured peak, nothing else
            "gemm_only_ceiling_x": best["reference"] / (flops / 1e9 / peak),
            # ... and with the one fused Adam pass over its parameters each step that the same settings need
            "gemm_and_adam_ceiling_x": best["reference"] / (flops / 1e9 / peak + adam)}


def vae_parameter_count(d: int, hidden: int = 512, latent: int = 256) -> int:
    weights = d * hidden + 2 * hidden * hidden + hidden * 2 * latent + latent * hidden + hidden * d
    return weights + (4 * hidden + 2 * latent + d) + 4 * hidden  # + biases + BatchNorm gammas and betas


def adam_seconds(count: int, steps: int = 200) -> float:
    """CPU seconds of one fused Adam step (torch's kernel) over `count` float32 parameters."""
    p, g, m, v, t = torch.randn(count), torch.randn(count), torch.zeros(count), torch.zeros(count), torch.zeros(())

    def adam() -> None:
        torch._fused_adam_([p], [g], [m], [v], [], [t], lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.0,
                           eps=1e-8, amsgrad=False, maximize=False)

    for _ in range(10):  # warm-up
        adam()
    start = time.process_time()
    for _ in range(steps):
        adam()
    return (time.process_time() - start) / steps

