"""Building TensorRT engines for the image graph (optional extra: `pip install cgil[tensorrt]`).

Written against the TensorRT 10 Python API (builder + ONNX parser + optimisation profile + timing
cache), pinned to one major: TensorRT 11 drops BuilderFlag.FP16/INT8 (deprecated since 10.12) and
onnxruntime-gpu links libnvinfer.so.10. Networks are built strongly typed: the fp16 graph carries its
half-precision types and the int8 graph its Q/DQ nodes, so no FP16/INT8 flags are set and TensorRT
cannot silently pick other precisions than the ones of the checked ONNX graph; fp32 engines have TF32
cleared (PRECISION_MATH, shared with ONNX Runtime's TensorRT EP options).

A serialized engine only runs on the TensorRT version and GPU that built it, so engines are
cached under a key of (ONNX sha256, TensorRT version, GPU name, precision, profile): a new driver
stack or another GPU finds no entry and rebuilds from the bundled ONNX instead of failing to
deserialize. Engine building is device work: the runtime's TensorRT backend (re)builds here on the
device, and `cgil export --format tensorrt` builds through the same function. Nothing here imports torch.

Verified where: docs/gpu.md. No development machine has a GPU or TensorRT: the graphs are checked
statically (export/tensorrt_check.py) and `cgil bench gpu` builds and gates engines where TensorRT is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .artifacts import atomic_write_bytes, cache_root, sha256_file
from .errors import CgilError
from .format import IMAGE_INPUT


def import_cudart():
    """cuda-python's runtime API: `cuda.bindings.runtime` since 12.6, `cuda.cudart` before."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


TENSORRT_MAJOR = 10  # = pyproject's tensorrt extra (tensorrt>=10,<11)

# The math TensorRT may use for each bundle precision, one table for both ways cgil gets an engine:
# the native build here (strongly typed: the graph's types decide fp16/int8, so only TF32 is a flag)
# and ONNX Runtime's TensorRT EP (weakly typed: "fp16"/"int8" become trt_fp16_enable/trt_int8_enable).
# fp32 engines are gated at cosine >= 0.9999 against fp32, so TF32 (TensorRT's default, 10-bit
# mantissas in matmuls) is cleared for them; fp16 and int8 engines already compute in half.
# The int8 graph for TensorRT is the fp16 graph with Q/DQ around its weight matmuls (export/quantize.py).
PRECISION_MATH = {"fp32": {"fp16": False, "int8": False, "tf32": False},
                  "fp16": {"fp16": True, "int8": False, "tf32": True},
                  "int8": {"fp16": True, "int8": True, "tf32": True}}


def configure_builder(trt: Any, config: Any, precision: str) -> None:
    """The builder-config flags of a strongly typed build of `precision`: no FP16/INT8 flags (a strongly
    typed network refuses them; TensorRT's docs: explicit quantization needs no precision flags), and
    TF32 cleared unless PRECISION_MATH allows it."""
    if precision not in PRECISION_MATH:
        raise CgilError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISION_MATH)}")
    if not PRECISION_MATH[precision]["tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)


def check_tensorrt_version(version: str) -> None:
    """Refuse any TensorRT but the major this module is written for, with what to install."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = -1
    if major != TENSORRT_MAJOR:
        raise CgilError(f"cgil builds engines with TensorRT {TENSORRT_MAJOR}.x, found TensorRT {version}: "
                        f"pip install 'tensorrt>={TENSORRT_MAJOR},<{TENSORRT_MAJOR + 1}' "
                        "(the major onnxruntime-gpu links, libnvinfer.so.10)")


def require_tensorrt():
    try:
        import tensorrt as trt

        cudart = import_cudart()
    except ImportError as e:
        raise CgilError("TensorRT needs the optional extra: pip install 'cgil[tensorrt]' "
                        f"(tensorrt + cuda-python) and an NVIDIA GPU ({e})") from e
    check_tensorrt_version(trt.__version__)
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise CgilError("TensorRT is installed but no CUDA GPU is visible")
    return trt, cudart


def use_device(index: int) -> None:
    """Make GPU `index` current for this thread: builds, gpu_name() and engine buffers follow it."""
    from .tensorrt_backend import _check

    _, cudart = require_tensorrt()
    _check(cudart.cudaSetDevice(int(index)))


def gpu_name() -> str:
    """The name of the current GPU (cudaSetDevice / use_device), the one the engine is built for."""
    from .tensorrt_backend import _check

    _, cudart = require_tensorrt()
    device = _check(cudart.cudaGetDevice())
    err, props = cudart.cudaGetDeviceProperties(int(device))
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


def default_cache_dir() -> Path:
    return cache_root("tensorrt")


def cache_key(onnx_sha256: str, precision: str, image_hw: tuple[int, int], max_batch: int) -> dict[str, Any]:
    trt, _ = require_tensorrt()
    return {"onnx_sha256": onnx_sha256, "tensorrt": trt.__version__, "gpu": gpu_name(), "precision": precision,
            "tf32": PRECISION_MATH[precision]["tf32"],  # engines cached before TF32 was cleared for fp32 do not match
            "profile": {"min": [1, *image_hw, 3], "opt": [max(1, max_batch // 2), *image_hw, 3],
                        "max": [max_batch, *image_hw, 3]}}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def build_engine(onnx_path: Path, precision: str, image_hw: tuple[int, int], max_batch: int,
                 cache_dir: Optional[Path] = None) -> tuple[bytes, dict[str, Any]]:
    """Serialized engine bytes and their cache key; reused from the engine cache when the key matches."""
    trt, _ = require_tensorrt()

    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(sha256_file(onnx_path), precision, image_hw, max_batch)
    cached = cache_dir / f"image-{key_digest(key)}.plan"
    if cached.is_file():
        return cached.read_bytes(), key

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed (TensorRT 10: explicit batch is the only mode): layer precisions are the graph's.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CgilError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    # fp16 comes from the fp16 graph's types, int8 from the Q/DQ nodes of the int8 graph (explicit
    # quantization, no calibrator); the flags are configure_builder's.
    configure_builder(trt, config, precision)
    h, w = image_hw
    profile = builder.create_optimization_profile()
    p = key["profile"]
    profile.set_shape(IMAGE_INPUT, tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
    config.add_optimization_profile(profile)
    # The timing cache keeps kernel measurements across builds (other precisions, other bundles).
    timing_path = cache_dir / f"timing-{key_digest({'tensorrt': key['tensorrt'], 'gpu': key['gpu']})}.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CgilError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    data = bytes(plan)
    atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))  # fsynced: a crash leaves old or new
    atomic_write_bytes(cached, data)
    atomic_write_bytes(cached.with_suffix(".json"), json.dumps(key, indent=2).encode())
    return data, key
