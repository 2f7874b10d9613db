"""Image-path backends: uint8 NHWC pixels in, L2-normalised float32 embeddings out.

`onnxruntime` and `tensorrt` live here and never import torch (edge devices often cannot install
it). Other backends are plugged in from above with `register_backend` (the CLI registers the torch
cross-check backend of export/), or passed to `Classifier` as an instance: the runtime imports
nothing of the learner.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence, Union

import numpy as np

from .errors import CgilError

if TYPE_CHECKING:
    from .bundle import BundleManifest

BUILTIN_BACKENDS = ("auto", "onnxruntime", "tensorrt")
# What "auto" asks ONNX Runtime for, fastest first. Not the TensorRT EP: it compiles an engine on the
# first request of every new shape unless given a cache and profiles; native TensorRT is the
# "tensorrt" backend, and the TensorRT EP is used only when asked for by name (with both, see below).
PROVIDER_PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def onnxruntime_conflict() -> Optional[str]:
    """Both onnxruntime and onnxruntime-gpu installed: they write one `onnxruntime` package, and
    whichever was installed last wins, so the CUDA provider can vanish without an error."""
    from importlib import metadata

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(found) < 2:
        return None
    return (f"both {' and '.join(found)} are installed and overwrite each other; keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")


def choose_providers(requested: Optional[Sequence[str]] = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            conflict = onnxruntime_conflict()
            raise CgilError(f"ONNX Runtime provider(s) {', '.join(missing)} not installed; available: {', '.join(available)}"
                            + (f" ({conflict})" if conflict else ""))
        return list(requested)
    return [p for p in PROVIDER_PREFERENCE if p in available] or list(available)


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip wheels (ORT >= 1.21), so that the torch-free runtime finds
    them as torch would; with system-wide CUDA libraries this finds nothing and changes nothing.
    ORT prints its warnings here with print(): they go to stderr, so `predict --json` stays JSON."""
    import contextlib
    import sys

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                ort.preload_dlls()
        except Exception:  # libraries elsewhere (system CUDA): session creation reports what is missing
            pass


def ort_tensorrt_cache(model: Path, root: Optional[Path] = None) -> Path:
    """The TensorRT EP's engine and timing cache folder of one image graph. ORT names its cached engines
    after the graph's structure and input shapes, not its weights: two bundles of one architecture
    would load each other's engines, so every graph (by the sha256 of its file) gets its own folder."""
    from .artifacts import cache_root, sha256_file

    return Path(root or cache_root("ort-tensorrt")) / sha256_file(model)[:24]


def provider_options(provider: str, precision: str, model: Path, input_name: Optional[str] = None,
                     image_hw: Optional[tuple[int, int]] = None, max_batch: Optional[int] = None,
                     cache_root: Optional[Path] = None, device_id: Optional[int] = None) -> dict[str, object]:
    """The TensorRT EP's options: engine and timing caches on disk (one folder per graph), a batch profile
    1..max_batch, and the precision flags the native TensorRT build uses for this precision
    (tensorrt_build.PRECISION_MATH), so no request ever waits for an engine build after the first start."""
    device: dict[str, object] = {} if device_id is None or provider not in GPU_PROVIDERS else {"device_id": int(device_id)}
    if provider != "TensorrtExecutionProvider":
        return device
    from .tensorrt_build import PRECISION_MATH

    cache = ort_tensorrt_cache(model, cache_root)
    cache.mkdir(parents=True, exist_ok=True)
    math = PRECISION_MATH[precision]
    opts: dict[str, object] = {**device, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                               "trt_fp16_enable": math["fp16"], "trt_int8_enable": math["int8"]}
    if input_name and image_hw and max_batch:
        h, w = image_hw
        shape = lambda b: f"{input_name}:{b}x{h}x{w}x3"  # noqa: E731
        opts.update({"trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(max(1, max_batch // 2)),
                     "trt_profile_max_shapes": shape(max_batch)})
    return opts


def check_providers(path: Path, asked: Sequence[str], got: Sequence[str], explicit: bool) -> None:
    """ONNX Runtime drops a provider it cannot start (missing CUDA/cuDNN/TensorRT libraries) and runs
    on the CPU without an error: refuse that when the provider was asked for, say so when it was "auto"."""
    dropped = [p for p in asked if p not in got]
    if not dropped:
        return
    conflict = onnxruntime_conflict()
    why = (f"ONNX Runtime could not start {', '.join(dropped)} for {Path(path).name} and fell back to "
           f"{', '.join(got)} (missing CUDA/cuDNN/TensorRT libraries?"
           + (f" {conflict}" if conflict else "") + ")")
    if explicit:
        raise CgilError(why)
    import sys

    print(f"warning: {why}", file=sys.stderr)


def ort_session(path: Path, providers: Optional[Sequence[str]] = None, precision: str = "fp32", threads: int = 0,
                spinning: bool = True, image_hw: Optional[tuple[int, int]] = None, max_batch: Optional[int] = None,
                device_id: Optional[int] = None):
    import onnxruntime as ort

    explicit = bool(providers)
    providers = choose_providers(providers)
    if any(p in GPU_PROVIDERS for p in providers):
        preload_cuda_libraries()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if not spinning:  # idle worker threads sleep instead of spinning: no CPU stolen from other work in the process
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if precision == "fp16" and providers[0] == "CPUExecutionProvider":
        # ORT's CPU layout-level fusions crash on fp16 transformer graphs (seen with 1.32): stop one level below.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    from .format import IMAGE_INPUT

    options = [provider_options(p, precision, path, IMAGE_INPUT, image_hw, max_batch, device_id=device_id) for p in providers]
    try:
        session = _no_fallback_session(ort, path, opts, providers, options)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        if explicit or providers == ["CPUExecutionProvider"]:
            raise CgilError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from e
        session = _no_fallback_session(ort, path, opts, ["CPUExecutionProvider"], [{}])  # "auto": say so below
    check_providers(path, providers, session.get_providers(), explicit)
    return session


def _no_fallback_session(ort, path: Path, opts, providers: Sequence[str], options: list):
    """An InferenceSession that never swaps providers by itself: ORT's Python fallback (at creation and
    on a failed run) would move a GPU session to the CPU and print about it on stdout. cgil decides
    instead (check_providers), and whatever ORT prints goes to stderr."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        session = ort.InferenceSession(str(path), opts, providers=list(providers), provider_options=options,
                                       enable_fallback=0)
    session.disable_fallback()
    return session


class OnnxRuntimeImage:
    name = "onnxruntime"

    def __init__(self, path: Path, providers: Optional[Sequence[str]] = None, precision: str = "fp32", threads: int = 0,
                 spinning: bool = True, image_hw: Optional[tuple[int, int]] = None, max_batch: Optional[int] = None,
                 device_id: Optional[int] = None):
        self.session = ort_session(path, providers, precision, threads, spinning, image_hw, max_batch, device_id)
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_shape = tuple(inp.shape[1:])

    def embed(self, pixels: np.ndarray) -> np.ndarray:  # InferenceSession.run is thread-safe
        return self.session.run([self.output_name], {self.input_name: pixels})[0].astype(np.float32, copy=False)


def tensorrt_usable() -> bool:
    """TensorRT of the major cgil builds for, cuda-python and a GPU: what "auto" needs to pick TensorRT."""
    try:
        import tensorrt

        from .tensorrt_build import TENSORRT_MAJOR, import_cudart

        if not str(tensorrt.__version__).startswith(f"{TENSORRT_MAJOR}."):
            return False  # another major: auto uses ONNX Runtime; --backend tensorrt says why

        cudart = import_cudart()
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


class ImageBackend(Protocol):
    """What Classifier needs of an image engine."""

    name: str
    providers: list[str]

    def embed(self, pixels: np.ndarray) -> np.ndarray:  # uint8 (N, H, W, 3) -> float32 (N, D), rows L2-normalised
        ...


BackendFactory = Callable[[Path, "BundleManifest"], ImageBackend]
_PLUGGED: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `name` a backend choice: factory(bundle_dir, manifest) -> ImageBackend."""
    _PLUGGED[name] = factory


def backend_names() -> list[str]:
    return list(BUILTIN_BACKENDS) + sorted(_PLUGGED)


def make_backend(backend: Union[str, ImageBackend], bundle: Path, manifest: "BundleManifest",
                 providers: Optional[Sequence[str]] = None, threads: int = 0) -> ImageBackend:
    if not isinstance(backend, str):
        return backend
    name = backend
    if name in _PLUGGED:
        return _PLUGGED[name](bundle, manifest)
    if name not in BUILTIN_BACKENDS:
        raise CgilError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    if name == "auto":
        name = "tensorrt" if manifest.engine.get("tensorrt") and tensorrt_usable() else "onnxruntime"
    if name == "onnxruntime":
        return OnnxRuntimeImage(manifest.image_engine, providers, manifest.precision, threads,
                                image_hw=tuple(manifest.preprocess["size"]), max_batch=manifest.max_batch)
    from .tensorrt_backend import TensorRTImage

    return TensorRTImage(bundle, manifest)


def int8_graph_is_tensorrts(manifest: "BundleManifest") -> bool:
    """Whether an int8 bundle's image.onnx is the TensorRT int8 graph (symmetric int8 Q/DQ, float
    biases): export records it in engine["int8"]; bundles from before that record are TensorRT's
    exactly when they carry a TensorRT plan (only --format tensorrt quantized for TensorRT)."""
    return manifest.engine.get("int8", "tensorrt" if manifest.engine.get("tensorrt") else "cpu") == "tensorrt"


def refuse_cpu_int8_for_tensorrt(manifest: "BundleManifest") -> None:
    """TensorRT would rebuild from the bundle's image.onnx; an int8 graph quantized for ONNX Runtime's CPU
    kernels (uint8 activations, non-zero zero points, int32 bias) is one TensorRT cannot build."""
    if manifest.precision == "int8" and not int8_graph_is_tensorrts(manifest):
        raise CgilError("--backend tensorrt: this int8 bundle's image graph is quantized for ONNX Runtime on the CPU "
                        "(uint8 activations, int32 bias), which TensorRT cannot build; use --backend onnxruntime, or "
                        "export for TensorRT: cgil export RUN --format tensorrt --precision int8")
