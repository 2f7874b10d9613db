"""Image-path backends: uint8 NHWC pixels in, L2-normalised float32 embeddings out.

`onnxruntime` and `tensorrt` never import torch (edge devices often cannot install it); `torch`
rebuilds the model from the bundle's identity and exists to cross-check the other two.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cgil.errors import CgilError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
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


class TorchImage:
    """The same graph in PyTorch eager, rebuilt from the bundle's model identity (needs cgil + torch)."""

    name = "torch"

    def __init__(self, manifest: dict[str, Any]):
        import torch

        from cgil.clip import create_clip
        from export.onnx_export import ImageGraph

        ident = manifest["model"]
        weights = ident.get("weights_id", "")
        seed = int(weights.split("seed=")[1]) if weights.startswith("random:seed=") else 0
        clip = create_clip(ident["model"], ident.get("pretrained"), "cpu", seed)
        if (clip.identity.weights_id, clip.identity.config_sha) != (weights, ident.get("config_sha")):
            raise CgilError(f"the torch backend rebuilt {clip.identity.model} ({clip.identity.weights_id}), "
                            f"not the bundle's {ident['model']} ({weights})")
        pre = manifest["preprocess"]
        self._torch = torch
        self.graph = ImageGraph(clip.model, pre["mean"], pre["std"]).eval()
        self.providers = ["torch-cpu"]

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.graph(self._torch.from_numpy(np.ascontiguousarray(pixels))).numpy()


def tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401

        from export.tensorrt import import_cudart

        cudart = import_cudart()
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def make_backend(name: str, bundle: Path, manifest: dict[str, Any], providers: Optional[Sequence[str]] = None,
                 threads: int = 0):
    if name not in BACKENDS:
        raise CgilError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    engine = manifest["engine"]
    if name == "auto":
        name = "tensorrt" if engine.get("tensorrt") and tensorrt_usable() else "onnxruntime"
    if name == "onnxruntime":
        return OnnxRuntimeImage(bundle / engine["image"], providers, manifest.get("precision", "fp32"), threads)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTImage

        return TensorRTImage(bundle, manifest)
    return TorchImage(manifest)
