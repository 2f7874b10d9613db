"""Part 2 of `cgil bench gpu`: TensorRT engines and ONNX Runtime CUDA, where those libraries are installed.

fp32, fp16 and int8 engines of cgil-tiny and ViT-B-16: the static TensorRT check (setup, so --dry-run
runs it on the CPU), a strongly typed build, the gates against ONNX Runtime CPU fp32 (min cosine
>= 0.9999 for fp32 with TF32 cleared, >= 0.999 for fp16, top-1 agreement >= 99% with
the zero-shot digit keys), then timings next to ONNX Runtime's CUDA provider. Without TensorRT or
onnxruntime-gpu, each row says what was skipped and why.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def setup_tensorrt(ctx) -> dict:
    """CPU work: which library is missing, then (unless both are and this is a real run) the image graphs
    of every precision, their static TensorRT check (rows of their own) and the ORT CPU fp32 references."""
    from cgil.clip import create_clip, preprocess_config
    from export.onnx_export import export_image
    from export.quantize import to_fp16, to_int8
    from export.tensorrt_check import tensorrt_problems
    from runtime.backends import OnnxRuntimeImage

    from .latency import digits_pixels, zero_shot_keys

    missing = _missing()
    if len(missing) == 2 and not ctx.dry_run:  # neither library: say so before minutes of export and calibration
        return {"missing": missing, "models": [], "summary": "neither TensorRT nor onnxruntime-gpu"}
    models = []
    for name in (["cgil-tiny"] if ctx.quick else ["cgil-tiny", "ViT-B-16"]):
        clip = create_clip(name, None, "cpu", 0)
        cfg = preprocess_config(clip)
        test, _ = digits_pixels(cfg, "test", 256)
        calibration, _ = digits_pixels(cfg, "train", 64 if name != "cgil-tiny" else 256)
        d = ctx.work / "tensorrt" / name
        d.mkdir(parents=True, exist_ok=True)
        fp32 = export_image(clip, cfg, d / "fp32.onnx")
        graphs = {"fp32": fp32, "fp16": to_fp16(fp32, d / "fp16.onnx"),
                  "int8": to_int8(fp32, d / "int8.onnx", [calibration[i:i + 16] for i in range(0, len(calibration), 16)],
                                  target="tensorrt")}
        for precision, path in graphs.items():
            problems = tensorrt_problems(path)
            ctx.add(2, "tensorrt", f"{name} {precision} static check", "failed" if problems else "ok",
                    note="; ".join(problems[:3]) or "TensorRT 10 strongly typed: buildable (export/tensorrt_check.py)")
        models.append({"name": name, "hw": tuple(cfg["size"]), "dim": clip.identity.embed_dim, "test": test,
                       "keys": zero_shot_keys(clip), "graphs": graphs,
                       "reference": OnnxRuntimeImage(fp32, ["CPUExecutionProvider"]).embed(test)})
    return {"missing": missing, "models": models, "summary": f"{len(models)} model(s) exported and statically checked"}


def run_tensorrt(ctx, state: dict) -> None:
    from export.bundle import ENGINE_MIN_COSINE
    from export.onnx_export import min_cosine
    from export.quantize import top1_agreement
    from export.tensorrt_check import tensorrt_problems

    from .latency_gpu import Unavailable, ort_cuda_session_or_raise, tensorrt_engine_or_raise

    if len(state["missing"]) == 2:
        for what, why in state["missing"].items():
            ctx.add(2, what, "all", "skipped", note=f"skipped: {why}")
        return
    for m in state["models"]:
        name, test, reference, keys = m["name"], m["test"], m["reference"], m["keys"]
        for precision in ("fp32", "fp16", "int8"):
            path = m["graphs"][precision]
            if tensorrt_problems(path):
                continue  # its static check row says why
            try:
                engine = tensorrt_engine_or_raise(path, precision, m["hw"], m["dim"], 32, cache_dir=ctx.work / "trt-cache",
                                                  device_index=ctx.index)
            except Unavailable as why:
                ctx.add(2, "tensorrt", f"{name} {precision} engine", "skipped", note=f"skipped: {why}")
                continue
            out = engine.embed_all(test)
            cos, agree = min_cosine(out, reference), top1_agreement(reference, out, keys)
            least = ENGINE_MIN_COSINE.get(precision)  # the gates of `cgil export --format tensorrt`
            passed = agree >= 0.99 and (least is None or cos >= least)
            ctx.add(2, "tensorrt", f"{name} {precision} engine vs ORT CPU fp32", "ok" if passed else "failed",
                    min_cosine=cos, top1_agreement=agree,
                    target=f">= {least} cosine, >= 99% top-1" if least else ">= 99% top-1",
                    note="fp32: TF32 cleared" if precision == "fp32" else "")
            _time_host(ctx, f"{name} TensorRT {precision}", engine.embed, test)
        for precision in ("fp32", "fp16"):
            try:
                session = ort_cuda_session_or_raise(m["graphs"][precision], precision, ctx.index)
            except Unavailable as why:
                ctx.add(2, "ort-cuda", f"{name} ORT CUDA {precision}", "skipped", note=f"skipped: {why}")
                continue
            _time_host(ctx, f"{name} ORT CUDA {precision}", session.embed, test)


def _missing() -> dict[str, str]:
    """Which of TensorRT and ONNX Runtime's CUDA provider cannot run here, and why."""
    import onnxruntime as ort

    from runtime.errors import CgilError
    from runtime.tensorrt_build import require_tensorrt

    out = {}
    try:
        require_tensorrt()
    except CgilError as e:
        out["tensorrt"] = str(e)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        out["ort-cuda"] = "onnxruntime-gpu not installed (onnxruntime has no CUDAExecutionProvider)"
    return out


def _time_host(ctx, item: str, embed: Callable[[np.ndarray], np.ndarray], test: np.ndarray) -> None:
    from .common import time_call

    for batch in (1, 8, 32):
        pixels = np.ascontiguousarray(np.resize(test, (batch, *test.shape[1:])))
        stats = time_call(lambda: embed(pixels), warmup=5, repeats=5 if ctx.quick else 50)
        ctx.add(2, "tensorrt" if "TensorRT" in item else "ort-cuda", f"{item} batch {batch}", "ok",
                p50_ms=stats["p50_ms"], p99_ms=stats["p99_ms"], images_per_s=batch / (stats["p50_ms"] / 1e3),
                note="host in, host out (copies included)")
