"""runtime: torch-free preprocessing, tokenizer, backends, verified loading and atomic head swaps."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import CgilError
from test_export import test_images
from conftest import BLOCK_TORCH

ROOT = Path(__file__).resolve().parent.parent


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           [(40, 57), (57, 40), (20, 13), (224, 300), (32, 32), (31, 100), (1, 1), (500, 7)]]
    gray = Image.fromarray(rng.integers(0, 256, (45, 38), dtype=np.uint8))
    return rgb + [gray, rgb[0].convert("P"), rgb[1].convert("CMYK")]


# ---- preprocessing and tokenizer equal open_clip's ------------------------------------------------------
def test_preprocess_equals_open_clips_eval_transform(tiny_clip):
    from cgil.data import to_rgb
    from cgil.clip import preprocess_config
    from runtime.preprocess import Preprocess

    pre = Preprocess.from_config(preprocess_config(tiny_clip))
    worst = 0.0
    for img in test_images(60) + _odd_images():
        ours = pre.normalize(pre.pixels(img)[None])[0]
        theirs = tiny_clip.preprocess(to_rgb(img)).numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= 1e-6


@pytest.mark.parametrize("size,mode", [((224, 224), "shortest"), ((64, 48), "shortest"), ((64, 64), "longest"), ((40, 64), "squash")])
def test_preprocess_equals_open_clip_for_other_sizes_and_resize_modes(size, mode):
    from open_clip.transform import image_transform

    from runtime.preprocess import Preprocess

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = {"size": list(size), "mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": mode, "fill_color": 0}
    ours, theirs = Preprocess.from_config(cfg), image_transform(size, False, mean, std, resize_mode=mode)
    for img in _odd_images()[:8]:
        diff = np.abs(ours.normalize(ours.pixels(img)[None])[0] - theirs(img).numpy()).max()
        assert diff <= 1e-6, (img.size, diff)


def test_bpe_tokenizer_gives_open_clips_ids():
    import open_clip
    from open_clip.tokenizer import default_bpe

    from runtime.tokenizer import BpeTokenizer

    texts = ["a photo of a zero", "X X seven.", "Hello,   World!! it's the café_au_lait 123", "naïve ÆSIR — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂",
             "&amp;lt;tag&gt; don't", "a " * 100, "", "big-red truck #42", "日本語のテキスト"]
    np.testing.assert_array_equal(BpeTokenizer(default_bpe())(texts), open_clip.get_tokenizer("ViT-B-16")(texts).numpy())


# ---- the classifier ------------------------------------------------------------------------------------
def test_classifier_predicts_what_the_pytorch_model_predicts(fp32_bundle, tiny_clip):
    import torch
    from safetensors.numpy import load_file

    from runtime import Classifier

    clf = Classifier(fp32_bundle, backend="onnxruntime")
    assert clf.backend.providers == ["CPUExecutionProvider"]
    images = test_images(100)
    keys = load_file(str(clf.head.directory / "head.safetensors"))["keys"]
    feats = tiny_clip.encode_images(torch.stack([tiny_clip.preprocess(im) for im in images])).numpy()
    expected = [clf.head.class_names[i] for i in (feats @ keys.T).argmax(1)]
    preds = clf.predict(images, top_k=3)
    assert [p.labels[0] for p in preds] == expected
    assert all(len(p.labels) == 3 and p.scores == sorted(p.scores, reverse=True) for p in preds)
    emb = clf.embed(images[:4])
    assert emb.shape == (4, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # the torch backend (export's, passed in as an instance) runs the same graph in eager mode
    from export.torch_backend import TorchImage

    torch_emb = Classifier(fp32_bundle, backend=TorchImage(clf.manifest)).embed(images[:4])
    assert float((emb * torch_emb).sum(1).min()) >= 0.9999


def test_top_k_larger_than_the_head_is_clamped_and_empty_input_is_fine(fp32_bundle):
    from runtime import Classifier

    clf = Classifier(fp32_bundle, backend="onnxruntime")
    assert len(clf.predict(test_images(1), top_k=50)[0].labels) == clf.head.num_classes == 10
    assert clf.predict([]) == [] and clf.embed([]).shape == (0, 64)


def test_int8_classifier_mostly_agrees_with_fp32(fp32_bundle, int8_bundle):
    from runtime import Classifier

    images = test_images(100)
    a = [p.labels[0] for p in Classifier(fp32_bundle).predict(images, top_k=1)]
    b = [p.labels[0] for p in Classifier(int8_bundle).predict(images, top_k=1)]
    assert np.mean([x == y for x, y in zip(a, b)]) >= 0.9


def test_class_names_are_added_on_device_without_torch_equal_to_torch_zero_shot(fp32_bundle, tiny_clip):
    import torch

    from cgil.text import TextEncoder, normalize
    from runtime import Classifier

    clf = Classifier(fp32_bundle)
    names = ["ten", "a red fire truck"]
    with torch.no_grad():
        ref = normalize(TextEncoder(tiny_clip.model, tiny_clip.tokenizer).zero_shot(names)).numpy()
    assert float((clf.zero_shot_keys(names) * ref).sum(1).min()) >= 0.9999
    head = clf.add_class_names(names)
    assert head.class_names[-2:] == names and head.keys.shape == (12, 64) and clf.head is head
    with pytest.raises(CgilError, match="already in the head"):
        clf.add_class_names(["ten"])


def test_providers_follow_what_is_installed_and_can_be_overridden():
    from runtime.backends import choose_providers

    assert choose_providers()[-1] == "CPUExecutionProvider"
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(CgilError, match="not installed"):
        choose_providers(["NoSuchExecutionProvider"])


def test_wrong_shapes_and_types_are_refused(fp32_bundle):
    from runtime import Classifier

    clf = Classifier(fp32_bundle)
    with pytest.raises(CgilError, match=r"uint8 \(N, 32, 32, 3\)"):
        clf.embed_pixels(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(CgilError, match=r"uint8 \(N, 32, 32, 3\)"):
        clf.embed_pixels(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(CgilError, match="image array must be uint8"):
        clf.predict([np.zeros((8, 8), np.float64)])
    with pytest.raises(CgilError, match="unknown backend"):
        Classifier(fp32_bundle, backend="tflite")


def test_onnxruntime_backend_never_imports_torch(fp32_bundle, int8_bundle, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "x.png")
    script = BLOCK_TORCH + f"""
sys.path.insert(0, {str(ROOT)!r})
from runtime import Classifier
import runtime.commands  # the predict command module too
for bundle in ({str(fp32_bundle)!r}, {str(int8_bundle)!r}):
    clf = Classifier(bundle, backend="auto")
    assert clf.backend.name == "onnxruntime", clf.backend.name
    print(clf.predict([{str(tmp_path / "x.png")!r}], top_k=2)[0].labels)
print(Classifier({str(fp32_bundle)!r}).zero_shot_keys(["cat"]).shape)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("torch-free")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch-free" in done.stdout and "(1, 64)" in done.stdout


# ---- verified loading ------------------------------------------------------------------------------------
@pytest.fixture
def bundle_copy(fp32_bundle, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(fp32_bundle, out)
    return out


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_modified_engine_file_is_refused_naming_it(bundle_copy):
    from runtime import Classifier

    _flip_byte(bundle_copy / "image.onnx")
    with pytest.raises(CgilError, match=r"image\.onnx does not match its sha256"):
        Classifier(bundle_copy)


def test_truncated_head_is_refused_naming_it(bundle_copy):
    from runtime import Classifier

    head = next((bundle_copy / "heads").glob("head-*")) / "head.safetensors"
    head.write_bytes(head.read_bytes()[:50])
    with pytest.raises(CgilError, match=r"head\.safetensors has 50 bytes"):
        Classifier(bundle_copy)


def test_half_written_bundle_is_refused(bundle_copy):
    from runtime import Classifier

    (bundle_copy / "manifest.json").unlink()  # an export interrupted before its last step
    with pytest.raises(CgilError, match="not a complete cgil-bundle"):
        Classifier(bundle_copy)
    (bundle_copy / "manifest.json").write_text('{"schema_version": 1, "kind": "cgil-bu')
    with pytest.raises(CgilError, match="manifest.json is corrupt"):
        Classifier(bundle_copy)


def test_bundle_without_a_published_head_is_refused(bundle_copy):
    from runtime import Classifier

    (bundle_copy / "heads" / "CURRENT").unlink()
    with pytest.raises(CgilError, match=r"no published head \(heads/CURRENT is missing\)"):
        Classifier(bundle_copy)


def test_other_schema_version_is_refused(bundle_copy):
    from runtime import Classifier

    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CgilError, match="schema version 99"):
        Classifier(bundle_copy)


def _publish_head(bundle: Path, name: str, edit) -> Path:
    """A new head version in the bundle (as an update would publish it), with head.json edited."""
    from runtime.artifacts import publish_version

    src = next((bundle / "heads").glob("head-*"))
    meta = json.loads((src / "head.json").read_text())
    edit(meta)

    def write(d: Path) -> None:
        for f in src.iterdir():
            if f.name not in ("manifest.json", "head.json"):
                shutil.copyfile(f, d / f.name)
        (d / "head.json").write_text(json.dumps(meta))

    return publish_version(bundle / "heads", name, write, kind="cgil-head", extra={"model": meta["model"]})


def test_head_from_another_model_is_refused(bundle_copy):
    from runtime import Classifier
    from runtime.bundle import load_head

    foreign = _publish_head(bundle_copy, "head-0099", lambda m: m["model"].update(weights_id="random:seed=7"))
    with pytest.raises(CgilError, match=r"head\.json was trained for cgil-tiny \(random:seed=7.*image engine is cgil-tiny \(random:seed=0"):
        load_head(foreign, json.loads((bundle_copy / "manifest.json").read_text())["model"])
    with pytest.raises(CgilError, match="not comparable"):
        Classifier(bundle_copy)  # CURRENT now points at the foreign head


def test_head_swap_is_atomic_under_concurrent_predict(bundle_copy):
    from runtime import Classifier

    clf = Classifier(bundle_copy)
    a_dir = clf.head.directory
    b_dir = _publish_head(bundle_copy, "head-0006",
                          lambda m: m.update(head_version=6, class_names=[f"B-{n}" for n in m["class_names"]]))
    a_names, b_names = set(clf.head.class_names), {f"B-{n}" for n in clf.head.class_names}
    images, errors, seen = test_images(16), [], set()
    stop = threading.Event()

    def predict_loop():
        while not stop.is_set():
            for p in clf.predict(images, top_k=10):
                labels = set(p.labels)
                if not (labels <= a_names or labels <= b_names):
                    errors.append(labels)
                seen.add("B" if labels <= b_names else "A")

    threads = [threading.Thread(target=predict_loop) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(30):
        clf.load_head(b_dir if i % 2 == 0 else a_dir)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and seen == {"A", "B"}
    assert clf.load_head().version == 6  # default: the bundle's heads/CURRENT
