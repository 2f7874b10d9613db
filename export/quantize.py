"""Lower-precision image graphs: fp16 conversion and int8 static quantization (ONNX Runtime tools).

Only the image path is converted: it is what runs per frame on a device. The text graphs run a few
times per head update and stay fp32.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from runtime.errors import CgilError

from .onnx_export import IMAGE_INPUT, check_onnx

# Numerically sensitive ops stay fp32 in the fp16 graph: LayerNorm and softmax statistics overflow or
# lose precision in half, and the final L2 norm sums D squares. Casts are inserted around them.
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceSum", "Pow", "Sqrt", "Erf"]


def to_fp16(src: Path, dst: Path) -> Path:
    onnx.save(_half(onnx.load(str(src))), str(dst))
    check_onnx(dst)
    return dst


def _half(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    del model.graph.value_info[:]  # stale fp32 annotations of intermediates would contradict the new types
    # keep_io_types: the graph still takes uint8 pixels and returns fp32 embeddings.
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32)
    wrapped = OnnxModel(half)
    wrapped.topological_sort()  # the converter appends its Cast nodes at the end of the node list
    return wrapped.model


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over uint8 batches of the run's training images."""

    def __init__(self, batches: Iterator[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {IMAGE_INPUT: batch}

    def rewind(self):  # not needed for a single calibration pass
        pass


# Where the int8 graph will run. ONNX Runtime's CPU kernels are fastest with asymmetric uint8
# activations (u8s8 GEMMs); TensorRT accepts only symmetric int8 Q/DQ (zero point 0) and no int32
# bias DequantizeLinear, so a graph for a TensorRT engine quantizes activations as symmetric int8.
INT8_TARGETS = ("cpu", "tensorrt")


def to_int8(src: Path, dst: Path, calibration: list[np.ndarray], target: str = "cpu") -> Path:
    """Static int8 (QDQ, per-channel weights) of the transformer's weight matmuls.

    Activations are calibrated on real images (the run's training split): MinMax ranges of the
    actual distribution, not of random noise. Norms, softmax and GELU stay float, and so do the
    first and last layers (patch embedding, output projection) and the activation x activation
    attention products: quantizing those cost 4-5 points of top-1 agreement with fp32 on digits
    for a few percent of the FLOPs.

    target="tensorrt": int8 activations with zero point 0 and float biases (see INT8_TARGETS), in the
    fp16 graph: every op outside the Q/DQ pairs computes in half (LayerNorm, softmax and the final norm
    stay fp32, as in to_fp16).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise CgilError("int8 export needs calibration images (the run's training split is empty)")
    if target not in INT8_TARGETS:
        raise CgilError(f"unknown int8 target {target!r}; choose one of: {', '.join(INT8_TARGETS)}")
    symmetric = target == "tensorrt"
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph cleanup first, as ONNX Runtime recommends before quantizing.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(dst), _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=_float_nodes(prepared),
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # MinMax keeps only per-tensor ReduceMin/ReduceMax per batch: memory stays small for a ViT-B.
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                           # Biases stay float for TensorRT (it has no int32 DequantizeLinear).
                           **({"QuantizeBias": False} if symmetric else {})},
        )
        if symmetric:
            # TensorRT's int8 graph is the fp16 graph with Q/DQ: everything around the int8 matmuls runs
            # in half, as in the fp16 engine (and as the TensorRT EP's fp16 flag would pick). fp16 Q/DQ
            # scales need opset 19 (opset 18's QuantizeLinear/DequantizeLinear take float scales only);
            # no op of these graphs changed meaning between 18 and 19.
            model = onnx.load(str(dst))
            for op in model.opset_import:
                if op.domain in ("", "ai.onnx"):
                    op.version = max(op.version, QDQ_FP16_OPSET)
            onnx.save(_half(model), str(dst))
    check_onnx(dst)
    return dst


QDQ_FP16_OPSET = 19


def _float_nodes(path: Path) -> list[str]:
    """Matmuls kept in float: products of two activations, and the last (output projection)."""
    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    keep = [n.name for n in matmuls if not any(i in constants for i in n.input)]
    if matmuls:
        keep.append(matmuls[-1].name)
    return keep


def top1_agreement(reference: np.ndarray, other: np.ndarray, keys: np.ndarray) -> float:
    """Share of images whose top-1 class under `keys` is the same for both embedding sets."""
    if len(reference) == 0:
        return 1.0
    return float(((reference @ keys.T).argmax(1) == (other @ keys.T).argmax(1)).mean())
