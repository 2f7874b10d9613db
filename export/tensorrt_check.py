"""A static TensorRT-compatibility check of an exported ONNX graph (runs on any CPU, no TensorRT needed).

No development machine has a GPU or TensorRT, so this is what proves, in the test suite, that the
graphs we export can be parsed and built by TensorRT 10 in strongly typed mode. It encodes the
parser's documented rules (onnx-tensorrt docs/operators.md for TensorRT 10) for what our graphs use:

* uint8 exists only as a network input/output, and a uint8 input must go straight into a Cast to a
  float type: TensorRT rejects any layer computing on uint8 (e.g. a uint8 Transpose).
* Q/DQ is symmetric int8 only: QuantizeLinear/DequantizeLinear with an int8 zero point that is all
  zeros and a constant scale. No uint8 activations (the ORT CPU default), no int32 bias DQ.
* Ops of the default ONNX domain from the parser's support list (no ORT-only com.microsoft ops),
  opset 9..20, and tensor types TensorRT knows.

`cgil export --format tensorrt` runs it before building an engine; tests run it on every precision.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from runtime.errors import CgilError

# The subset of onnx-tensorrt's TensorRT 10 operator list that CLIP-like graphs can contain.
SUPPORTED_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv
ConvTranspose Cos CumSum DequantizeLinear Div Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish
Identity InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean
Min Mod Mul Neg NonZero Not Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements
ScatterND Shape Sigmoid Sign Sin Size Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose
Trilu Unsqueeze Where Xor
""".split())
OPSET_RANGE = (9, 20)
# Types TensorRT 10 has (uint8: network I/O only, checked separately; int8: through Q/DQ only).
TENSOR_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
                TensorProto.INT8, TensorProto.BOOL, TensorProto.UINT8}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _type_name(t: int) -> str:
    return TensorProto.DataType.Name(t)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def tensorrt_problems(model: Union[str, Path, onnx.ModelProto], limit: int = 20) -> list[str]:
    """What TensorRT 10 (strongly typed) would refuse in this graph; empty when it is buildable."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} is outside TensorRT 10's range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    graph = model.graph
    types: dict[str, int] = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    constants = _constants(graph)
    for init in graph.initializer:
        types[init.name] = init.data_type
    graph_inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}

    for node in graph.node:
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom-domain op {node.domain}.{node.op_type} (ONNX Runtime only)")
        elif node.op_type not in SUPPORTED_OPS:
            problems.append(f"{where}: op not supported by the TensorRT ONNX parser")
        for name in node.input:
            if name in graph_inputs and types.get(name) == TensorProto.UINT8:
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if node.op_type != "Cast" or to not in FLOAT_TYPES:
                    problems.append(f"{where}: consumes the uint8 input {name!r}; TensorRT needs a Cast to float first")
        for name in node.output:
            t = types.get(name)
            if t is None:
                continue
            if t == TensorProto.UINT8 and name not in graph_outputs:
                problems.append(f"{where}: intermediate uint8 tensor {name!r} (uint8 is network I/O only)")
            elif t not in TENSOR_TYPES:
                problems.append(f"{where}: tensor {name!r} of type {_type_name(t)} unknown to TensorRT")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _qdq_problems(node, where, types, constants)
    seen: set[str] = set()
    unique = [p for p in problems if not (p in seen or seen.add(p))]
    return unique[:limit] + ([f"... and {len(unique) - limit} more"] if len(unique) > limit else [])


def _qdq_problems(node: onnx.NodeProto, where: str, types: dict[str, int], constants: dict[str, np.ndarray]) -> list[str]:
    out = []
    scale = node.input[1] if len(node.input) > 1 else ""
    zero = node.input[2] if len(node.input) > 2 else ""
    if scale not in constants:
        out.append(f"{where}: scale {scale!r} is not a constant (TensorRT needs constant Q/DQ scales)")
    if not zero:  # an absent zero point means uint8 in ONNX
        out.append(f"{where}: no zero point, i.e. uint8 quantization; TensorRT needs int8 with zero point 0")
    elif zero in constants:
        z = constants[zero]
        if z.dtype != np.int8:
            out.append(f"{where}: zero point of type {z.dtype} (TensorRT quantizes to int8 only)")
        elif np.any(z != 0):
            out.append(f"{where}: non-zero zero point (TensorRT accepts only symmetric int8 quantization)")
    else:
        out.append(f"{where}: zero point {zero!r} is not a constant")
    if node.op_type == "DequantizeLinear":
        t = types.get(node.input[0])
        if t is not None and t != TensorProto.INT8:
            out.append(f"{where}: dequantizes a {_type_name(t)} tensor (TensorRT: int8 only; "
                       "an int32 bias DequantizeLinear needs QuantizeBias=False)")
    return out


def require_tensorrt_compatible(path: Path) -> None:
    """Raise one CgilError that lists what TensorRT would refuse in the graph at `path`."""
    problems = tensorrt_problems(path)
    if problems:
        raise CgilError(f"{Path(path).name} cannot be built by TensorRT: " + "; ".join(problems[:3])
                        + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
