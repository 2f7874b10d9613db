"""FLOP-rate limits of this CPU that the latency rows are compared with: nominal ISA peak and measured GEMM."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any


# fp32 FLOP per cycle per core = FMA pipes x fp32 lanes per pipe x 2. Zen 3/4 (family 0x19): two 256-bit
# FMA pipes (Zen 4 runs AVX-512 as 2 x 256 bit) -> 32; Zen 5 (0x1a): two 512-bit FMA pipes -> 64.
_AMD_FLOP_PER_CYCLE = {0x17: 16, 0x19: 32, 0x1A: 64}


def nominal_peak(threads: int) -> dict[str, Any]:
    """threads x clock x fp32 FLOP/cycle from /proc/cpuinfo (the clock a VM reports: nominal, not boost)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        return {}
    flags, mhz = set(info.get("flags", "").split()), float(info.get("cpu MHz", 0) or 0)
    family = int(info.get("cpu family", 0) or 0)
    if info.get("vendor_id") == "AuthenticAMD" and family in _AMD_FLOP_PER_CYCLE:
        per_cycle, why = _AMD_FLOP_PER_CYCLE[family], f"AMD family {family:#x}: 2 FMA pipes"
    elif "avx512f" in flags:  # Intel server cores with two 512-bit FMA units
        per_cycle, why = 64, "AVX-512: 2 x 512-bit FMA"
    elif "fma" in flags:
        per_cycle, why = 32, "AVX2: 2 x 256-bit FMA"
    else:
        per_cycle, why = 8, "SSE"
    return {"gflop_per_s": threads * mhz / 1e3 * per_cycle, "mhz": mhz, "flop_per_cycle": per_cycle, "threads": threads,
            "basis": f"{threads} cores x {mhz / 1e3:.2f} GHz (/proc/cpuinfo) x {per_cycle} fp32 FLOP/cycle ({why})"}


def gemm_peak(threads: int, sizes: tuple[int, ...] = (2048, 3072), tries: int = 5) -> dict[str, Any]:
    """Attainable fp32 FLOP rate: best of `tries` square GEMMs in torch (oneDNN/MKL) and ONNX Runtime (MLAS)."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(threads)
    rates: dict[str, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                                  [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                                  [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
                                  [numpy_helper.from_array(b.numpy(), "B")])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                                    opts, providers=["CPUExecutionProvider"])
        an = a.numpy()
        for label, fn in (("torch", lambda: torch.mm(a, b)), ("onnxruntime", lambda: sess.run(None, {"A": an}))):
            fn()
            best = float("inf")
            for _ in range(tries):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            rates[f"{label} {n}^3"] = 2.0 * n ** 3 / best / 1e9
    top = max(rates, key=rates.get)
    return {"gflop_per_s": rates[top], "best": top, "rates": rates, "threads": threads,
            "basis": f"best of {tries} fp32 square GEMMs (n = {', '.join(map(str, sizes))}) in torch and ONNX Runtime"}
