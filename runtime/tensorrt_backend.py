"""TensorRT backend for the image engine (TensorRT 10 API + cuda-python; no torch, no pycuda).

The bundle's plan is used when its cache key (TensorRT version, GPU name) matches this device;
otherwise the engine is rebuilt from the bundled ONNX into the local engine cache, so upgrading
TensorRT or moving the bundle to another GPU costs one build, not a failure.

Not run on the development machines (no GPU): see the README for what was verified where.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import BundleManifest, inside
from .errors import CgilError


def _check(result):
    """cuda-python returns (cudaError_t, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CgilError(f"CUDA call failed with error {int(err)}")
    return values[0] if len(values) == 1 else values


class TensorRTEngine:
    """A deserialized image engine with device buffers for max_batch: uint8 NHWC in, float32 (N, D) out.

    Built from plan bytes alone, so `cgil export --format tensorrt` runs the engine it has just built
    on the test images (the same gates as the ONNX graphs) before it ships the bundle.
    """

    name = "tensorrt"

    def __init__(self, plan: bytes, image_hw: tuple[int, int], embed_dim: int, max_batch: int):
        from .tensorrt_build import require_tensorrt

        trt, cudart = require_tensorrt()
        self.trt, self.cudart = trt, cudart
        h, w = image_hw
        self.max_batch = max_batch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise CgilError("TensorRT could not deserialize the engine (see the log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.embed_dim = embed_dim
        self.image_hw = (h, w)
        self.stream = _check(cudart.cudaStreamCreate())
        # Device buffers sized once for max_batch; every call reuses them.
        self.d_in = _check(cudart.cudaMalloc(self.max_batch * h * w * 3))
        self.d_out = _check(cudart.cudaMalloc(self.max_batch * self.embed_dim * 4))
        self.providers = ["TensorRT " + trt.__version__]
        import threading

        self._lock = threading.Lock()  # one execution context: serialise concurrent calls

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        if n > self.max_batch:
            raise CgilError(f"batch {n} exceeds the engine's max batch {self.max_batch}")
        cudart = self.cudart
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        out = np.empty((n, self.embed_dim), np.float32)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            self.context.set_input_shape(self.input, (n, *self.image_hw, 3))
            self.context.set_tensor_address(self.input, int(self.d_in))
            self.context.set_tensor_address(self.output, int(self.d_out))
            _check(cudart.cudaMemcpyAsync(self.d_in, pixels.ctypes.data, pixels.nbytes, h2d, self.stream))
            if not self.context.execute_async_v3(int(self.stream)):
                raise CgilError("TensorRT execution failed")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.d_out, out.nbytes, d2h, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
        return out

    def embed_all(self, pixels: np.ndarray) -> np.ndarray:
        """Any number of images, in chunks of max_batch."""
        parts = [self.embed(pixels[i:i + self.max_batch]) for i in range(0, len(pixels), self.max_batch)]
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def __del__(self):
        try:
            self.cudart.cudaFree(self.d_in)
            self.cudart.cudaFree(self.d_out)
            self.cudart.cudaStreamDestroy(self.stream)
        except Exception:
            pass


class TensorRTImage(TensorRTEngine):
    """The bundle's engine: its own plan when it was built for this TensorRT and GPU, else rebuilt."""

    def __init__(self, bundle: Path, manifest: BundleManifest):
        from .backends import refuse_cpu_int8_for_tensorrt
        from .tensorrt_build import build_engine, gpu_name, require_tensorrt

        refuse_cpu_int8_for_tensorrt(manifest)  # before TensorRT is looked for: the graph is the problem

        trt, _ = require_tensorrt()
        h, w = manifest.preprocess["size"]
        plan_info = manifest.engine.get("tensorrt") or {}
        key = plan_info.get("key", {})
        if plan_info and key.get("tensorrt") == trt.__version__ and key.get("gpu") == gpu_name():
            plan = inside(bundle, plan_info["plan"], "TensorRT plan").read_bytes()
        else:  # another TensorRT or GPU than the one that built the bundle's plan
            plan, _ = build_engine(manifest.image_engine, key.get("precision", manifest.precision), (h, w),
                                   manifest.max_batch)
        super().__init__(plan, (h, w), manifest.identity.embed_dim, manifest.max_batch)
