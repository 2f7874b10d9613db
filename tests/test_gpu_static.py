"""The GPU paths' static checks (issue 18), all on the CPU: no TensorRT, onnxruntime-gpu or GPU here.

* `--backend tensorrt` refuses an int8 bundle quantized for the ORT CPU before looking for TensorRT;
* ORT's TensorRT EP gets one engine-cache folder per image graph (sha256 of the file);
* the native build's flags per precision (TF32 cleared for fp32), recorded on a fake builder config,
  and the TensorRT EP's precision options come from the same table;
* ORT sessions never fall back to the CPU on their own, and say nothing on stdout;
* the torch.export fallback's graphs pass the TensorRT check; the TensorRT int8 graph computes in half;
* TF32 is read through torch's fp32_precision API; CUDA runs keep only the deterministic attention
  kernel, and the bench's resume check compares every state tensor byte for byte.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import CgilError


# ---- item 2: --backend tensorrt on a CPU int8 bundle ---------------------------------------------
def test_tensorrt_backend_refuses_the_cpu_int8_graph_in_one_line(int8_bundle, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    assert json.loads((int8_bundle / "manifest.json").read_text())["engine"]["int8"] == "cpu"
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = CliRunner().invoke(app, ["predict", str(int8_bundle), str(image), "--backend", "tensorrt"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "quantized for ONNX Runtime on the CPU" in lines[0]
    assert "cgil export RUN --format tensorrt --precision int8" in result.output.replace("\n", "")


# ---- item 4: one TensorRT EP cache folder per graph ----------------------------------------------
def test_tensorrt_ep_caches_are_keyed_by_the_graphs_sha256(tiny_graphs, tmp_path):
    from runtime.artifacts import sha256_file
    from runtime.backends import provider_options

    fp32, fp16 = tiny_graphs["fp32"], tiny_graphs["fp16"]
    same_architecture = tmp_path / "other-weights.onnx"  # one changed weight: same structure, other engine
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).size > 1)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(same_architecture))

    def folder(path, precision="fp32"):
        return provider_options("TensorrtExecutionProvider", precision, path, "pixels", (32, 32), 8,
                                cache_root=tmp_path / "cache")["trt_engine_cache_path"]

    folders = {folder(fp32), folder(fp16, "fp16"), folder(same_architecture)}
    assert len(folders) == 3
    assert folder(fp32) == str(tmp_path / "cache" / sha256_file(fp32)[:24]) and Path(folder(fp32)).is_dir()
    opts = provider_options("TensorrtExecutionProvider", "fp32", fp32, cache_root=tmp_path / "cache")
    assert opts["trt_timing_cache_path"] == opts["trt_engine_cache_path"] == folder(fp32)


# ---- items 5 and 8: precision flags, native build and TensorRT EP --------------------------------
class _Flags:
    """Stands in for tensorrt.BuilderFlag: the real TensorRT cannot be imported here."""
    FP16, INT8, TF32, BF16, FP8 = "FP16", "INT8", "TF32", "BF16", "FP8"


class _FakeTensorRT:
    BuilderFlag = _Flags


class _RecordingConfig:
    """Records which flags cgil's code sets or clears on a TensorRT IBuilderConfig; nothing else."""

    def __init__(self):
        self.set, self.cleared = [], []

    def set_flag(self, flag):
        self.set.append(flag)

    def clear_flag(self, flag):
        self.cleared.append(flag)


@pytest.mark.parametrize("precision, cleared", [("fp32", ["TF32"]), ("fp16", []), ("int8", [])])
def test_native_builds_set_no_precision_flags_and_clear_tf32_for_fp32(precision, cleared):
    from runtime.tensorrt_build import configure_builder

    config = _RecordingConfig()
    configure_builder(_FakeTensorRT, config, precision)
    assert config.set == [] and config.cleared == cleared
    with pytest.raises(CgilError, match="unknown precision 'tf32'"):
        configure_builder(_FakeTensorRT, _RecordingConfig(), "tf32")


def test_the_build_uses_configure_builder_and_keys_engines_by_tf32():
    source = (Path(__file__).parent.parent / "runtime" / "tensorrt_build.py").read_text()
    build = source[source.index("def build_engine"):]
    assert "configure_builder(trt, config, precision)" in build
    assert '"tf32": PRECISION_MATH[precision]["tf32"]' in source


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_ep_precision_options_follow_the_native_table(tiny_graphs, tmp_path, precision):
    from runtime.backends import provider_options
    from runtime.tensorrt_build import PRECISION_MATH

    opts = provider_options("TensorrtExecutionProvider", precision, tiny_graphs["fp32"], cache_root=tmp_path)
    assert (opts["trt_fp16_enable"], opts["trt_int8_enable"]) == (PRECISION_MATH[precision]["fp16"],
                                                                  PRECISION_MATH[precision]["int8"])
    assert PRECISION_MATH["fp32"] == {"fp16": False, "int8": False, "tf32": False}


# ---- item 9: no silent fallback, nothing on stdout -----------------------------------------------
def test_ort_sessions_have_fallback_disabled_and_print_nothing(tiny_graphs, capsys):
    from runtime.backends import OnnxRuntimeImage, preload_cuda_libraries

    backend = OnnxRuntimeImage(tiny_graphs["fp32"], ["CPUExecutionProvider"])
    assert backend.session._enable_fallback is False  # ORT's own flag: no provider swap on a failed run
    preload_cuda_libraries()
    assert capsys.readouterr().out == ""


# ---- items 3 and 8: both exporters, every precision, int8 on the fp16 graph ----------------------
@pytest.fixture(scope="module")
def dynamo_graphs(tiny_graphs, tmp_path_factory):
    """The image graphs as the torch.export fallback of `cgil export` writes them."""
    from export.onnx_export import export_image
    from export.quantize import to_fp16, to_int8

    from benchmarks.latency import digits_pixels

    d = tmp_path_factory.mktemp("dynamo")
    fp32 = export_image(tiny_graphs["clip"], tiny_graphs["preprocess"], d / "fp32.onnx", exporter="dynamo")
    calibration, _ = digits_pixels(tiny_graphs["preprocess"], "train", 64)
    return {"fp32": fp32, "fp16": to_fp16(fp32, d / "fp16.onnx"),
            "int8-tensorrt": to_int8(fp32, d / "int8.onnx", [calibration[i:i + 16] for i in range(0, 64, 16)],
                                     target="tensorrt")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-tensorrt"])
def test_the_dynamo_fallback_passes_the_tensorrt_check_at_every_precision(dynamo_graphs, precision):
    """The TorchScript exporter's graphs: test_gpu_guards.py::test_every_precision_for_tensorrt_passes_the_static_check."""
    from export.tensorrt_check import tensorrt_problems

    assert tensorrt_problems(dynamo_graphs[precision]) == []


def test_the_dynamo_graph_reads_the_batch_from_the_cast_and_equals_the_traced_one(tiny_graphs, dynamo_graphs):
    import onnx

    from benchmarks.latency import digits_pixels
    from export.onnx_export import min_cosine
    from runtime.backends import OnnxRuntimeImage

    graph = onnx.load(str(dynamo_graphs["fp32"])).graph
    assert [n.op_type for n in graph.node if "pixels" in n.input] == ["Cast"]
    assert any(n.op_type == "Shape" for n in graph.node)  # the symbolic batch is still read, from the Cast
    test, _ = digits_pixels(tiny_graphs["preprocess"], "test", 24)
    embed = lambda p: OnnxRuntimeImage(p, ["CPUExecutionProvider"]).embed(test)  # noqa: E731
    assert min_cosine(embed(dynamo_graphs["fp32"]), embed(tiny_graphs["fp32"])) >= 0.9999


def test_the_tensorrt_int8_graph_computes_in_half_around_its_int8_matmuls(tiny_graphs):
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(tiny_graphs["int8-tensorrt"]))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(types[n.input[1]] == TensorProto.FLOAT16 for n in dq)  # fp16 scales: DQ yields half
    quantized = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                 and any(i in {d.output[0] for d in dq} for i in n.input)]
    assert quantized and all(types[n.output[0]] == TensorProto.FLOAT16 for n in quantized)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(types[n.output[0]] == TensorProto.FLOAT for n in norms)  # kept fp32, as in fp16


# ---- item 7: the feature cache reads TF32 through torch's fp32_precision API ---------------------
@pytest.mark.parametrize("setting, expected", [
    ("pass", {"tf32_matmul": False, "tf32_cudnn": True}),  # torch's defaults
    ("b.fp32_precision = 'ieee'", {"tf32_matmul": False, "tf32_cudnn": False}),  # the legacy cudnn read raises
    ("b.cuda.matmul.fp32_precision = 'tf32'; b.cudnn.conv.fp32_precision = 'ieee'",
     {"tf32_matmul": True, "tf32_cudnn": False}),
    ("b.cuda.matmul.allow_tf32 = True; b.cudnn.allow_tf32 = False", {"tf32_matmul": True, "tf32_cudnn": False}),
])
def test_tf32_settings_use_the_new_api_without_raising(setting, expected):
    """In a fresh process each: torch's precision settings are process-wide and do not restore cleanly."""
    import subprocess
    import sys

    code = f"import json, torch; b = torch.backends; {setting}; from cgil.features import tf32_settings; " \
           "print(json.dumps(tf32_settings()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


# ---- item 6: exact resume on CUDA ----------------------------------------------------------------
def test_cuda_runs_leave_only_the_deterministic_attention_kernel_on(monkeypatch):
    import torch

    from cgil.train import deterministic_cuda

    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(), cuda.math_sdp_enabled())
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        cuda.enable_flash_sdp(True)
        cuda.enable_mem_efficient_sdp(True)
        deterministic_cuda("cpu")
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()  # the CPU run changes nothing
        deterministic_cuda("cuda:1")
        assert not (cuda.flash_sdp_enabled() or cuda.mem_efficient_sdp_enabled() or cuda.cudnn_sdp_enabled())
        assert cuda.math_sdp_enabled() and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        for enable, on in zip((cuda.enable_flash_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_cudnn_sdp,
                               cuda.enable_math_sdp), before):
            enable(on)


def test_the_resume_check_compares_every_state_tensor_byte_for_byte(tiny_run, tmp_path):
    import torch

    from benchmarks.gpu_e2e import differing_state_tensors
    from cgil.runs import open_run
    from cgil.tensor_io import load_tensors, save_tensors

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    assert differing_state_tensors(tiny_run, copy) == []
    _, state = open_run(copy)
    head = state / "head.safetensors"
    tensors = load_tensors(head)
    name = sorted(tensors)[0]
    t = tensors[name].clone()
    t.view(-1)[0] = torch.nextafter(t.view(-1)[0], torch.tensor(float("inf"), dtype=t.dtype))  # one ulp
    save_tensors(head, {**tensors, name: t})
    assert differing_state_tensors(tiny_run, copy) == [f"head.safetensors:{name}"]
