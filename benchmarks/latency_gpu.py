"""GPU engines of the latency benchmark, and the torch CUDA runner `cgil bench gpu` times.

Registered in benchmarks.latency next to the CPU engines, so on a GPU machine they are measured like
any other engine; where a piece is missing (no CUDA GPU, no onnxruntime-gpu, no TensorRT) a factory
raises `Unavailable` and the table gets a row that says why. No "ORT CUDA int8": the CUDA execution
provider runs QDQ graphs by dequantizing to float, so such a row would time fp32 under an int8 name.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import numpy as np

Embed = Callable[[np.ndarray], np.ndarray]
ENGINE_MAX_BATCH = 32  # the TensorRT profile of the latency table's largest batch


class Unavailable(Exception):
    """This engine cannot run on this machine; the message says what is missing."""


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU")


class TorchCudaEmbedder:
    """The image graph on CUDA in fp32 or fp16, replayed from one CUDA graph per batch size.

    CUDA graphs remove the per-kernel launch cost that dominates ViT-B-16 at small batches. A graph
    whose capture fails falls back to eager calls, and `mode` says which one ran.
    """

    def __init__(self, graph: Any, dtype: str = "fp16", device: str = "cuda", cuda_graphs: bool = True):
        import torch

        require_cuda()
        self.torch = torch
        self.device = torch.device(device)  # cuda:N: the model, the captured graphs and their inputs live on N
        self.graph = copy.deepcopy(graph).to(self.device).eval()
        self.half = dtype == "fp16"
        if self.half:
            self.graph.model.half()
        self.cuda_graphs = cuda_graphs
        self._captured: dict[tuple, tuple] = {}
        self.mode = "CUDA graphs" if cuda_graphs else "eager"
        self.notes: list[str] = []

    def forward(self, pixels):  # uint8 (N, H, W, 3) on the GPU -> float32 (N, D), rows L2-normalised
        torch, g = self.torch, self.graph
        x = pixels.float().permute(0, 3, 1, 2) * g.scale - g.shift
        out = g.model.encode_image(x.half() if self.half else x).float()
        return torch.nn.functional.normalize(out, dim=-1)

    def _capture(self, shape: tuple):
        torch = self.torch
        static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph requires
                self.forward(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.forward(static_in)
        return graph, static_in, static_out

    def on_device(self, pixels):
        """Embeddings of a uint8 batch already on the GPU; the result stays there (no sync)."""
        torch = self.torch
        if not self.cuda_graphs:
            with torch.no_grad():
                return self.forward(pixels)
        shape = tuple(pixels.shape)
        if shape not in self._captured:
            try:
                self._captured[shape] = self._capture(shape)
            except Exception as e:  # e.g. an op that cannot be captured: eager, and say so
                self.cuda_graphs, self.mode = False, "eager (CUDA graph capture failed)"
                self.notes.append(f"CUDA graph capture failed: {str(e).splitlines()[0]}")
                return self.on_device(pixels)
        graph, static_in, static_out = self._captured[shape]
        static_in.copy_(pixels)
        graph.replay()
        return static_out

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Host in, host out (the copies count): what a caller of the latency table waits for."""
        torch = self.torch
        gpu = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        return self.on_device(gpu).cpu().numpy()


def ort_cuda_session_or_raise(path, precision: str = "fp32", device_id: int = 0):
    """An ONNX Runtime image backend on the CUDA EP, or Unavailable (CPU wheel, missing CUDA libs)."""
    import onnxruntime as ort

    from runtime.backends import OnnxRuntimeImage, onnxruntime_conflict
    from runtime.errors import CgilError

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        conflict = onnxruntime_conflict()
        raise Unavailable("onnxruntime-gpu not installed (onnxruntime has no CUDAExecutionProvider"
                          + (f"; {conflict}" if conflict else "") + ")")
    try:
        return OnnxRuntimeImage(path, ["CUDAExecutionProvider"], precision, device_id=device_id)
    except CgilError as e:  # the CUDA EP could not start: check_providers names why
        raise Unavailable(str(e)) from e


def tensorrt_engine_or_raise(path, precision: str, image_hw: tuple[int, int], embed_dim: int,
                             max_batch: int = ENGINE_MAX_BATCH, cache_dir: Optional[Any] = None, device_index: int = 0):
    """A TensorRT engine of the ONNX graph at `path` (static check, build, deserialize) on GPU
    `device_index`, or Unavailable."""
    from export.tensorrt_check import require_tensorrt_compatible
    from runtime.errors import CgilError
    from runtime.tensorrt_build import build_engine, require_tensorrt, use_device

    try:
        require_tensorrt()
    except CgilError as e:
        raise Unavailable(str(e)) from e
    use_device(device_index)  # the build, the plan's GPU key and the engine's buffers: all on this GPU
    from runtime.tensorrt_backend import TensorRTEngine

    require_tensorrt_compatible(path)
    plan, _ = build_engine(path, precision, image_hw, max_batch, cache_dir)
    return TensorRTEngine(plan, image_hw, embed_dim, max_batch)


def _torch_cuda(dtype: str):
    def factory(case) -> Embed:
        return TorchCudaEmbedder(case.graph, dtype)

    return factory


def _ort_cuda(case) -> Embed:
    require_cuda()
    return ort_cuda_session_or_raise(case.onnx("fp32")).embed


def _tensorrt_fp16(case) -> Embed:
    require_cuda()
    engine = tensorrt_engine_or_raise(case.onnx("fp16"), "fp16", tuple(case.preprocess["size"]),
                                      case.clip.identity.embed_dim)
    return engine.embed_all


GPU_ENGINES: dict[str, Callable[[Any], Embed]] = {
    "torch CUDA fp32": _torch_cuda("fp32"),
    "torch CUDA fp16": _torch_cuda("fp16"),
    "ORT CUDA fp32": _ort_cuda,
    "TensorRT fp16": _tensorrt_fp16,
}
