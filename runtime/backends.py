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
# Fastest first; ONNX Runtime falls back down this list for the nodes a provider cannot run.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: Optional[Sequence[str]] = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise CgilError(f"ONNX Runtime provider(s) {', '.join(missing)} not installed; available: {', '.join(available)}")
        return list(requested)
    return [p for p in PROVIDER_PREFERENCE if p in available] or list(available)


def ort_session(path: Path, providers: Optional[Sequence[str]] = None, precision: str = "fp32", threads: int = 0,
                spinning: bool = True):
    import onnxruntime as ort

    providers = choose_providers(providers)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if not spinning:  # idle worker threads sleep instead of spinning: no CPU stolen from other work in the process
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if precision == "fp16" and providers[0] == "CPUExecutionProvider":
        # ORT's CPU layout-level fusions crash on fp16 transformer graphs (seen with 1.32): stop one level below.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise CgilError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from e


class OnnxRuntimeImage:
    name = "onnxruntime"

    def __init__(self, path: Path, providers: Optional[Sequence[str]] = None, precision: str = "fp32", threads: int = 0,
                 spinning: bool = True):
        self.session = ort_session(path, providers, precision, threads, spinning)
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_shape = tuple(inp.shape[1:])

    def embed(self, pixels: np.ndarray) -> np.ndarray:  # InferenceSession.run is thread-safe
        return self.session.run([self.output_name], {self.input_name: pixels})[0].astype(np.float32, copy=False)


def tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401

        from .tensorrt_build import import_cudart

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
        return OnnxRuntimeImage(manifest.image_engine, providers, manifest.precision, threads)
    from .tensorrt_backend import TensorRTImage

    return TensorRTImage(bundle, manifest)
