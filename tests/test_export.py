"""Export: real ONNX graphs of the tiny model, checked with onnx.checker and ONNX Runtime against PyTorch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from runtime.errors import CgilError


def test_images(n: int | None = None) -> list:
    from cgil.data import get_dataset, load_image

    items = get_dataset("digits").test.items
    return [load_image(x) for x in (items if n is None else items[:n])]


test_images.__test__ = False  # a helper, not a test


# ---- the bundle -------------------------------------------------------------------------------------
def test_bundle_manifest_lists_every_file_with_its_sha256(fp32_bundle, tiny_run):
    from runtime.artifacts import SCHEMA_VERSION, read_json, sha256_file

    m = json.loads((fp32_bundle / "manifest.json").read_text())
    config = read_json(tiny_run / "config.json")
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["kind"] == "cgil-bundle" and m["precision"] == "fp32" and m["format"] == "onnx"
    assert m["model"] == config["model_identity"]
    assert m["preprocess"]["size"] == [32, 32] and len(m["preprocess"]["mean"]) == 3
    assert m["head"]["class_names"] == read_json(tiny_run / "state" / "task-004" / "head.json")["class_names"]
    assert m["head"]["head_version"] == 5
    on_disk = {str(p.relative_to(fp32_bundle)) for p in fp32_bundle.rglob("*") if p.is_file()}
    engine_files = {p for p in on_disk if not p.startswith("heads/") and p != "manifest.json"}
    assert set(m["files"]) == engine_files
    assert {"image.onnx", "text_zero_shot.onnx", "text_prompted.onnx", "tokenizer/bpe_simple_vocab_16e6.txt.gz"} <= engine_files
    for name, info in m["files"].items():
        assert sha256_file(fp32_bundle / name) == info["sha256"]
    # the head version: its own manifest covers head, replay store and prompts copied from the run
    head = fp32_bundle / m["head"]["version_dir"]
    head_manifest = json.loads((head / "manifest.json").read_text())
    assert head_manifest["kind"] == "cgil-head" and head_manifest["model"] == m["model"]
    assert {"head.safetensors", "head.json", "store.safetensors", "store.json", "prompt_context.safetensors"} <= set(head_manifest["files"])
    run_state = tiny_run / "state" / (tiny_run / "state" / "CURRENT").read_text().strip()
    assert sha256_file(head / "store.safetensors") == sha256_file(run_state / "store.safetensors")


def test_checks_are_recorded_and_pass(fp32_bundle):
    checks = json.loads((fp32_bundle / "manifest.json").read_text())["checks"]
    assert checks["image_fp32"]["min_cosine_vs_torch"] >= 0.9999 and checks["image_fp32"]["images"] == 540
    assert checks["text_zero_shot"]["min_cosine_vs_torch"] >= 0.9999
    assert checks["text_prompted"]["min_cosine_vs_torch"] >= 0.9999


@pytest.mark.parametrize("name", ["image.onnx", "text_zero_shot.onnx", "text_prompted.onnx"])
def test_graphs_are_valid_opset_17_plus_with_dynamic_batch_and_fused_layernorm(fp32_bundle, name):
    model = onnx.load(str(fp32_bundle / name))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for inp in model.graph.input:
        assert inp.type.tensor_type.shape.dim[0].dim_param, f"{name}: {inp.name} has a fixed batch axis"
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}


def test_image_graph_equals_pytorch_at_several_batch_sizes(fp32_bundle, tiny_clip):
    import torch

    from export.onnx_export import ImageGraph, min_cosine
    from runtime.backends import OnnxRuntimeImage
    from runtime.preprocess import Preprocess

    m = json.loads((fp32_bundle / "manifest.json").read_text())
    pre = Preprocess.from_config(m["preprocess"])
    pixels = pre.batch(test_images(13))
    graph = ImageGraph(tiny_clip.model, pre.mean, pre.std).eval()
    ort = OnnxRuntimeImage(fp32_bundle / "image.onnx")
    for n in (1, 5, 13):
        with torch.no_grad():
            ref = graph(torch.from_numpy(pixels[:n])).numpy()
        out = ort.embed(pixels[:n])
        assert out.shape == (n, 64)
        assert min_cosine(out, ref) >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # and the graph's in-graph normalisation equals open_clip's own eval transform + encode_image
    feats = tiny_clip.encode_images(torch.stack([tiny_clip.preprocess(im) for im in test_images(13)])).numpy()
    assert min_cosine(ort.embed(pixels), feats) >= 0.9999


def test_text_graphs_give_the_learners_keys_and_zero_shot_embeddings(fp32_bundle, tiny_run, tiny_clip):
    import torch
    from safetensors.numpy import load_file

    from cgil.state import load_learner
    from export.onnx_export import min_cosine
    from runtime.bundle import open_bundle
    from runtime.text import TextEncoderRuntime

    m = json.loads((fp32_bundle / "manifest.json").read_text())
    text = TextEncoderRuntime(fp32_bundle, open_bundle(fp32_bundle))
    learner, _ = load_learner(tiny_run / "state" / "task-004", tiny_clip)
    names = ["cat", "a big red fire truck", "zero", "naïve café"]  # unseen lengths: the length axis is dynamic
    with torch.no_grad():
        ref = learner.prompts.text.zero_shot(names).numpy()
    assert min_cosine(text.zero_shot(names), ref) >= 0.9999
    head_dir = fp32_bundle / m["head"]["version_dir"]
    ctx = load_file(str(head_dir / "prompt_context.safetensors"))
    keys = text.prompted_keys(ctx["context"], ctx["tokens"])
    assert min_cosine(keys, load_file(str(head_dir / "head.safetensors"))["keys"]) >= 0.9999


def test_int8_bundle_records_top1_agreement_with_fp32(int8_bundle):
    m = json.loads((int8_bundle / "manifest.json").read_text())
    check = m["checks"]["image_int8"]
    assert m["precision"] == "int8" and m["text"] is None
    assert check["images"] == 540 and 0.95 <= check["top1_agreement_vs_fp32"] <= 1.0
    ops = {n.op_type for n in onnx.load(str(int8_bundle / "image.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not (int8_bundle / "text_zero_shot.onnx").exists()


def test_fp16_keeps_layernorm_and_softmax_in_fp32_and_agrees_with_fp32(fp32_bundle, tmp_path):
    from export.quantize import to_fp16, top1_agreement
    from runtime.backends import OnnxRuntimeImage
    from runtime.preprocess import Preprocess

    half = to_fp16(fp32_bundle / "image.onnx", tmp_path / "image.fp16.onnx")
    model = onnx.load(str(half))
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types.values()
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            assert all(types.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for i in node.input[1:])
    m = json.loads((fp32_bundle / "manifest.json").read_text())
    pixels = Preprocess.from_config(m["preprocess"]).batch(test_images(200))
    ref = OnnxRuntimeImage(fp32_bundle / "image.onnx").embed(pixels)
    low = OnnxRuntimeImage(half, precision="fp16").embed(pixels)
    from safetensors.numpy import load_file

    keys = load_file(str(fp32_bundle / m["head"]["version_dir"] / "head.safetensors"))["keys"]
    assert top1_agreement(ref, low, keys) >= 0.99


# ---- refusals ----------------------------------------------------------------------------------------
def test_a_failed_check_leaves_no_bundle(tiny_run, tmp_path, monkeypatch):
    from export import bundle, onnx_export

    monkeypatch.setattr(onnx_export, "min_cosine", lambda a, b: 0.5)
    out = tmp_path / "b"
    with pytest.raises(CgilError, match=r"image graph \(fp32, dynamo exporter\): ONNX Runtime disagrees with PyTorch"):
        bundle.export_bundle(tiny_run, out, text=False)  # the traced graph failed, then the torch.export fallback too
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_existing_bundle_is_not_overwritten_without_force(fp32_bundle, tiny_run):
    from export.bundle import export_bundle

    with pytest.raises(CgilError, match="--force"):
        export_bundle(tiny_run, fp32_bundle)


@pytest.mark.parametrize("kwargs,message", [({"format": "coreml"}, "unknown format"), ({"precision": "int4"}, "unknown precision"),
                                            ({"max_batch": 0}, "max-batch")])
def test_bad_options_are_refused(tiny_run, tmp_path, kwargs, message):
    from export.bundle import export_bundle

    with pytest.raises(CgilError, match=message):
        export_bundle(tiny_run, tmp_path / "b", **kwargs)


def test_not_a_run_is_refused(tmp_path):
    from export.bundle import export_bundle

    with pytest.raises(CgilError, match="not a cgil run"):
        export_bundle(tmp_path, tmp_path / "b")


# ---- TensorRT and Triton -------------------------------------------------------------------------------
def _tensorrt_ready() -> bool:
    from runtime.backends import tensorrt_usable

    try:
        return tensorrt_usable()
    except Exception:
        return False


def test_tensorrt_export_without_tensorrt_says_what_to_install(tiny_run, tmp_path):
    if _tensorrt_ready():
        pytest.skip("TensorRT and a GPU are present: the refusal path does not apply")
    from export.bundle import export_bundle

    with pytest.raises(CgilError, match=r"cgil\[tensorrt\]|no CUDA GPU"):
        export_bundle(tiny_run, tmp_path / "b", format="tensorrt", precision="fp16")
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_ready(), reason="needs tensorrt + cuda-python and an NVIDIA GPU")
def test_tensorrt_engine_matches_onnxruntime(tiny_run, tmp_path, monkeypatch):  # pragma: no cover - GPU only
    monkeypatch.setenv("CGIL_CACHE", str(tmp_path / "cache"))
    from export.bundle import export_bundle
    from export.onnx_export import min_cosine
    from runtime import Classifier

    out = tmp_path / "trt"
    export_bundle(tiny_run, out, format="tensorrt", precision="fp16", max_batch=8, text=False)
    assert list((tmp_path / "cache" / "tensorrt").glob("image-*.plan"))  # the engine cache was filled
    trt_clf, ort_clf = Classifier(out, backend="tensorrt"), Classifier(out, backend="onnxruntime")
    images = test_images(20)
    assert min_cosine(trt_clf.embed(images), ort_clf.embed(images)) >= 0.999


def test_triton_repository_config_parses_with_tritons_protobuf(fp32_bundle, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] ships Triton's model_config proto")
    from export.triton import parse_config, write_repository

    model = write_repository(tmp_path / "repo", (fp32_bundle / "image.onnx").read_bytes(), (32, 32), 64, max_batch=16)
    config = parse_config(model.parent.parent / "config.pbtxt")
    assert config.name == "cgil_image" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16 and list(config.input[0].dims) == [32, 32, 3]
    assert config.input[0].name == "pixels" and list(config.output[0].dims) == [64]
    assert config.HasField("dynamic_batching") and 16 in config.dynamic_batching.preferred_batch_size
    # and the model file Triton would load is the verified engine
    assert model.read_bytes() == (fp32_bundle / "image.onnx").read_bytes()


def test_triton_bundle_is_usable_by_the_runtime(tiny_run, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from export.bundle import export_bundle
    from export.triton import parse_config
    from runtime import Classifier

    out = tmp_path / "triton"
    m = export_bundle(tiny_run, out, format="triton", max_batch=4, text=False)
    assert m["engine"]["image"] == "triton/cgil_image/1/model.onnx" and not (out / "image.onnx").exists()
    assert parse_config(out / "triton" / "cgil_image" / "config.pbtxt").max_batch_size == 4
    preds = Classifier(out, backend="onnxruntime").predict(test_images(3), top_k=2)
    assert len(preds) == 3 and all(len(p.labels) == 2 for p in preds)


def test_the_dynamo_exporter_gives_the_same_image_graph(fp32_bundle, tiny_clip, tmp_path):
    """torch 2.14's default exporter (torch.export) is the fallback path: it must stay correct too."""
    import torch

    from cgil.clip import preprocess_config
    from export.onnx_export import ImageGraph, export_image, min_cosine
    from runtime.backends import OnnxRuntimeImage
    from runtime.preprocess import Preprocess

    pre_cfg = preprocess_config(tiny_clip)
    path = export_image(tiny_clip, pre_cfg, tmp_path / "dynamo.onnx", exporter="dynamo")
    pixels = Preprocess.from_config(pre_cfg).batch(test_images(3))
    with torch.no_grad():
        ref = ImageGraph(tiny_clip.model, pre_cfg["mean"], pre_cfg["std"])(torch.from_numpy(pixels)).numpy()
    assert min_cosine(OnnxRuntimeImage(path).embed(pixels), ref) >= 0.9999
