"""The GPU path's CPU-side guards (issue 10): what can be proved without a GPU, TensorRT or onnxruntime-gpu.

* every exported image graph passes the static TensorRT check, and the check does refuse what the
  TensorRT parser refuses (a uint8 Transpose, asymmetric uint8 Q/DQ, int32 bias DQ);
* the TensorRT version gate, provider resolution, torchrun's GPU mapping, the device in the feature
  cache key, deterministic CUDA settings, re-evaluating a CUDA run on a CPU machine, Triton batching.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from runtime.errors import CgilError


# ---- the static TensorRT check -------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-tensorrt"])
def test_every_precision_for_tensorrt_passes_the_static_check(tiny_graphs, precision):
    from export.tensorrt_check import require_tensorrt_compatible, tensorrt_problems

    assert tensorrt_problems(tiny_graphs[precision]) == []
    require_tensorrt_compatible(tiny_graphs[precision])


def test_the_pixels_are_cast_before_any_other_op(tiny_graphs):
    graph = onnx.load(str(tiny_graphs["fp32"])).graph
    consumers = [n for n in graph.node if "pixels" in n.input]
    assert [n.op_type for n in consumers] == ["Cast"]
    assert onnx.helper.get_attribute_value(consumers[0].attribute[0]) == onnx.TensorProto.FLOAT


def test_the_check_refuses_a_uint8_transpose(tiny_graphs, tmp_path):
    """The graph the exporter wrote before issue 10 (transpose, then cast) is what TensorRT rejects."""
    from export import onnx_export as ox
    from export.tensorrt_check import require_tensorrt_compatible

    class TransposeFirst(ox.ImageGraph):
        def forward(self, pixels):
            x = pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift
            return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    cfg = tiny_graphs["preprocess"]
    path = ox.export_graph(TransposeFirst(tiny_graphs["clip"].model, cfg["mean"], cfg["std"]),
                           (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),), tmp_path / "old.onnx", ["pixels"],
                           ["image_embedding"], {"pixels": {0: "batch"}}, exporter="torchscript")
    with pytest.raises(CgilError, match=r"old.onnx cannot be built by TensorRT: Transpose .*uint8"):
        require_tensorrt_compatible(path)


def test_the_check_refuses_the_cpu_int8_graph(tiny_graphs):
    """ORT's CPU-fastest int8 (uint8 activations, non-zero zero points, int32 bias DQ) is not TensorRT's."""
    from export.tensorrt_check import tensorrt_problems

    problems = " | ".join(tensorrt_problems(tiny_graphs["int8-cpu"], limit=1000))
    assert "intermediate uint8 tensor" in problems
    assert "dequantizes a INT32 tensor" in problems


def test_tensorrt_int8_graph_is_symmetric_int8_and_agrees_with_fp32(tiny_graphs):
    from onnx import numpy_helper

    from benchmarks.latency import digits_pixels, zero_shot_keys
    from export.quantize import top1_agreement
    from runtime.backends import OnnxRuntimeImage

    graph = onnx.load(str(tiny_graphs["int8-tensorrt"])).graph
    zero_points = [i for i in graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(i.data_type == onnx.TensorProto.INT8 for i in zero_points)
    assert all(not numpy_helper.to_array(i).any() for i in zero_points)
    test, _ = digits_pixels(tiny_graphs["preprocess"], "test")
    embed = lambda p, prec: OnnxRuntimeImage(p, ["CPUExecutionProvider"], prec).embed(test)  # noqa: E731
    keys = zero_shot_keys(tiny_graphs["clip"])
    assert top1_agreement(embed(tiny_graphs["fp32"], "fp32"), embed(tiny_graphs["int8-tensorrt"], "int8"), keys) >= 0.99


def test_unknown_int8_target_is_one_line(tiny_graphs, tmp_path):
    from export.quantize import to_int8

    with pytest.raises(CgilError, match="unknown int8 target 'gpu'"):
        to_int8(tiny_graphs["fp32"], tmp_path / "x.onnx", [np.zeros((1, 32, 32, 3), np.uint8)], target="gpu")


# ---- TensorRT version and build ------------------------------------------------------------------
def test_only_tensorrt_10_is_accepted():
    from runtime.tensorrt_build import check_tensorrt_version

    check_tensorrt_version("10.16.0.72")
    for other in ("11.4.0", "8.6.1", "nonsense"):
        with pytest.raises(CgilError, match=r"TensorRT 10\.x.*tensorrt>=10,<11"):
            check_tensorrt_version(other)


def test_the_tensorrt_extra_pins_the_major_onnxruntime_gpu_links():
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'tensorrt = ["tensorrt>=10,<11"' in text


def test_the_build_is_strongly_typed_without_precision_flags():
    """No FP16/INT8 builder flags (gone in TensorRT 11, refused by strongly typed networks)."""
    source = (Path(__file__).parent.parent / "runtime" / "tensorrt_build.py").read_text()
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in source
    assert "BuilderFlag.FP16" not in source.replace("BuilderFlag.FP16/INT8", "")
    assert "set_flag(trt.BuilderFlag.INT8)" not in source


# ---- ONNX Runtime providers ----------------------------------------------------------------------
def test_auto_providers_never_start_with_the_tensorrt_ep():
    from runtime.backends import PROVIDER_PREFERENCE, choose_providers

    assert "TensorrtExecutionProvider" not in PROVIDER_PREFERENCE
    assert choose_providers()[-1] == "CPUExecutionProvider"


def test_a_dropped_provider_is_refused_when_asked_for_and_reported_when_auto(capsys):
    from runtime.backends import check_providers

    with pytest.raises(CgilError, match=r"could not start CUDAExecutionProvider for image.onnx and fell back to "
                                        r"CPUExecutionProvider"):
        check_providers(Path("image.onnx"), ["CUDAExecutionProvider", "CPUExecutionProvider"],
                        ["CPUExecutionProvider"], explicit=True)
    check_providers(Path("image.onnx"), ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"],
                    explicit=False)
    assert "warning: ONNX Runtime could not start CUDAExecutionProvider" in capsys.readouterr().err
    check_providers(Path("image.onnx"), ["CPUExecutionProvider"], ["CPUExecutionProvider"], explicit=True)


def test_asking_for_cuda_on_the_cpu_wheel_fails_clearly(tiny_graphs):
    import onnxruntime as ort

    from runtime.backends import OnnxRuntimeImage

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(CgilError, match="CUDAExecutionProvider not installed; available: .*CPUExecutionProvider"):
        OnnxRuntimeImage(tiny_graphs["fp32"], ["CUDAExecutionProvider"])


def test_both_onnxruntime_wheels_installed_is_named(tmp_path, monkeypatch):
    """A second `onnxruntime-gpu` distribution next to the CPU wheel (real dist-info on sys.path)."""
    from runtime.backends import choose_providers, onnxruntime_conflict

    assert onnxruntime_conflict() is None
    info = tmp_path / "onnxruntime_gpu-1.31.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "onnxruntime-gpu 1.31.0" in onnxruntime_conflict()
    with pytest.raises(CgilError, match=r"both onnxruntime .* and onnxruntime-gpu 1.31.0 are installed"):
        choose_providers(["CUDAExecutionProvider"])


def test_tensorrt_ep_gets_caches_profiles_and_precision(tmp_path):
    from runtime.backends import provider_options

    graph = tmp_path / "image.onnx"
    graph.write_bytes(b"graph")
    assert provider_options("CUDAExecutionProvider", "fp16", graph) == {}
    opts = provider_options("TensorrtExecutionProvider", "fp16", graph, "pixels", (224, 224), 32, cache_root=tmp_path)
    assert opts["trt_engine_cache_enable"] and Path(opts["trt_engine_cache_path"]).parent == tmp_path
    assert opts["trt_timing_cache_enable"] and opts["trt_fp16_enable"] and not opts["trt_int8_enable"]
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"], opts["trt_profile_max_shapes"]) == (
        "pixels:1x224x224x3", "pixels:16x224x224x3", "pixels:32x224x224x3")


# ---- torchrun, feature cache, determinism, evaluation, Triton ------------------------------------
def test_torchrun_gets_one_gpu_per_process_or_a_clear_error():
    from cgil.distributed import rank_gpu

    assert [rank_gpu("cuda", r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert rank_gpu("cuda:1", 0, 1, 2) == 1  # one process: --device cuda:N is honoured
    with pytest.raises(CgilError, match=r"torchrun started 4 processes per node but only 2 GPU\(s\).*--nproc-per-node 2"):
        rank_gpu("cuda", 3, 4, 2)
    with pytest.raises(CgilError, match=r"--device cuda:1 under torchrun would put all 2 processes on one GPU"):
        rank_gpu("cuda:1", 0, 2, 2)
    with pytest.raises(CgilError, match=r"--device cuda:3: only 2 GPU"):
        rank_gpu("cuda:3", 0, 1, 2)


def test_gpu_features_never_share_a_cache_key_with_cpu_features():
    from cgil.data import get_dataset
    from cgil.features import cache_key, device_facts

    from cgil.clip import create_clip

    clip, ds = create_clip("cgil-tiny", None, "cpu", 0), get_dataset("digits")
    assert device_facts(torch.device("cpu")) == {}
    cpu = cache_key(clip, ds, "test", [0, 1])
    h100 = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "tf32_matmul": False, "tf32_cudnn": True}
    keys = {cpu, cache_key(clip, ds, "test", [0, 1], device=h100),
            cache_key(clip, ds, "test", [0, 1], device={**h100, "tf32_matmul": True}),
            cache_key(clip, ds, "test", [0, 1], device={**h100, "gpu": "NVIDIA A100-SXM4-40GB"})}
    assert len(keys) == 4
    assert cache_key(clip, ds, "test", [0, 1], device={}) == cpu


def test_loader_workers_give_the_same_features():
    from cgil.clip import create_clip
    from cgil.data import get_dataset
    from cgil.features import embed_items

    clip = create_clip("cgil-tiny", None, "cpu", 0)
    items = get_dataset("digits").test.items[:40]
    assert torch.equal(embed_items(clip, items, 16, workers=0), embed_items(clip, items, 16, workers=2))


def test_cuda_runs_switch_on_deterministic_algorithms(monkeypatch):
    from cgil.train import deterministic_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    deterministic_cuda("cpu")
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    cuda = torch.backends.cuda
    sdp = [(cuda.enable_flash_sdp, cuda.flash_sdp_enabled()), (cuda.enable_mem_efficient_sdp, cuda.mem_efficient_sdp_enabled()),
           (cuda.enable_cudnn_sdp, cuda.cudnn_sdp_enabled()), (cuda.enable_math_sdp, cuda.math_sdp_enabled())]
    try:
        deterministic_cuda("cuda:0")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
    finally:  # process-wide switches (the attention ones steer CPU attention too): later tests get them back
        torch.use_deterministic_algorithms(False)
        for enable, on in sdp:
            enable(on)


def test_a_cuda_run_is_re_evaluated_on_a_cpu_machine(tiny_run, tmp_path):
    import shutil

    from cgil.runs import eval_device, evaluate_run

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    copy = tmp_path / "cuda-run"
    shutil.copytree(tiny_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["settings"]["device"] = "cuda"
    (copy / "config.json").write_text(json.dumps(config))
    assert eval_device("cuda") == "cpu" and eval_device("cuda", "cpu") == "cpu" and eval_device("cpu") == "cpu"
    assert evaluate_run(copy)["final_avg_acc"] == evaluate_run(tiny_run)["final_avg_acc"]


def test_update_device_is_checked_before_anything_is_read(tmp_path):
    from export.update import update_from_images

    with pytest.raises(CgilError, match=r"unknown device 'gpu'; choose one of: auto, cpu, cuda, cuda:N"):
        update_from_images(tmp_path / "no-bundle", tmp_path, device="gpu")


def test_triton_batches_single_image_requests():
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from export.triton import config_pbtxt

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    parse = lambda text: text_format.Parse(text, model_config_pb2.ModelConfig())  # noqa: E731
    config = parse(config_pbtxt((32, 32), 64, 8))
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    single = parse(config_pbtxt((32, 32), 64, 1))
    assert list(single.dynamic_batching.preferred_batch_size) == [] and single.HasField("dynamic_batching")


def test_prompt_keys_know_their_truncation_length_without_reading_the_device():
    """keys() passes the longest EOT from a host-side list (no GPU->host sync per step); same keys."""
    from cgil.clip import create_clip
    from cgil.generators import GeneratorConfig
    from cgil.learner import AlignConfig, Learner
    from cgil.text import normalize

    learner = Learner(create_clip("cgil-tiny", None, "cpu", 0), GeneratorConfig(), AlignConfig())
    learner.add_classes([0, 1, 2], ["cat", "a very long class name indeed", "dog"], 1)
    p = learner.prompts
    assert p.eot_on_host == p.text.eot_positions(p.tokens).tolist()
    embeds = p.text.embed_tokens(p.tokens)
    g = p.generator(p.zero_shot).unsqueeze(1).to(embeds.dtype)
    embeds = torch.cat([embeds[:, :1], p.ctx.to(embeds.dtype), g, embeds[:, 2 + p.n_ctx:]], dim=1)
    assert torch.equal(p.keys(), normalize(p.text(embeds, p.text.eot_positions(p.tokens))))
    p.load_learned_state(p.learned_state(), [5, 6, 7], ["dog", "cat", "a very long class name indeed"])
    assert p.eot_on_host == p.text.eot_positions(p.tokens).tolist()


def test_feature_extraction_leaves_the_global_rng_alone():
    """A run that computes its features must learn exactly like one that reads them from the cache."""
    from cgil.clip import create_clip
    from cgil.data import get_dataset
    from cgil.features import embed_items

    clip = create_clip("cgil-tiny", None, "cpu", 0)
    items = get_dataset("digits").test.items[:8]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    embed_items(clip, items, 4, workers=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_engine_gates_accept_a_faithful_fp16_engine_and_refuse_another_model(tiny_graphs):
    """The gates `cgil export --format tensorrt` applies to its engine, fed real embeddings: ORT's fp16
    graph stands in for a faithful fp16 engine, another model's graph for a broken one."""
    from cgil.clip import create_clip
    from export.bundle import gate_engine
    from export.onnx_export import export_image

    from benchmarks.latency import digits_pixels, zero_shot_keys
    from runtime.backends import OnnxRuntimeImage

    test, _ = digits_pixels(tiny_graphs["preprocess"], "test", 128)
    keys = zero_shot_keys(tiny_graphs["clip"])
    fp32 = OnnxRuntimeImage(tiny_graphs["fp32"], ["CPUExecutionProvider"]).embed(test)
    fp16 = OnnxRuntimeImage(tiny_graphs["fp16"], ["CPUExecutionProvider"], "fp16").embed(test)
    check = gate_engine("fp16", fp16, fp32, keys)
    assert check["min_cosine_vs_fp32"] >= 0.999 and check["top1_agreement_vs_fp32"] >= 0.99 and check["images"] == len(test)
    other_clip = create_clip("cgil-tiny", None, "cpu", 1)
    other = export_image(other_clip, tiny_graphs["preprocess"], tiny_graphs["fp32"].parent / "other.onnx")
    wrong = OnnxRuntimeImage(other, ["CPUExecutionProvider"]).embed(test)
    with pytest.raises(CgilError, match=r"TensorRT fp16 engine refused: min cosine"):
        gate_engine("fp16", wrong, fp32, keys)
    with pytest.raises(CgilError, match=r"TensorRT int8 engine refused: top-1 agreement with fp32 .*< 99%"):
        gate_engine("int8", wrong, fp32, keys, min_agreement=0.99)


def test_triton_with_a_tensorrt_plan_is_reachable_and_refused_clearly_without_tensorrt(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from runtime.backends import tensorrt_usable

    if tensorrt_usable():
        pytest.skip("TensorRT and a GPU are present")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "t"), "--format", "triton",
                                 "--triton-platform", "tensorrt"])
    assert result.exit_code == 2 and "cgil[tensorrt]" in result.output
    result = runner.invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "t"), "--format", "triton",
                                 "--triton-platform", "tensorflow"])
    assert result.exit_code == 2 and "unknown Triton platform 'tensorflow'" in result.output
    assert not (tmp_path / "t").exists()
