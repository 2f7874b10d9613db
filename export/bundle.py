"""`export_bundle`: a finished run -> a verified deployment bundle (layout: see runtime.bundle).

The bundle is built in a temporary sibling folder, every graph is checked (onnx.checker, then ONNX
Runtime against PyTorch on the run's own test images), the result is re-read as the runtime would
read it, and only then renamed to its final name. A failed check leaves no bundle behind.
"""
from __future__ import annotations

import inspect
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from cgil.clip import FrozenClip, create_clip, preprocess_config
from cgil.config import TrainConfig
from cgil.data import get_dataset, load_image
from cgil.runs import open_run
from cgil.state import check_identity, load_learner
from cgil.tensor_io import load_tensors, save_tensors
from runtime.artifacts import atomic_write_json, publish_version, read_json, sha256_file, verify_manifest
from runtime.bundle import load_head, open_bundle
from runtime.errors import CgilError
from runtime.format import (BUNDLE_KIND, HEAD_KIND, HEAD_META, HEAD_TENSORS, HEADS_DIR, IMAGE_ONNX, MANIFEST,
                            PROMPT_CONTEXT, PROMPTS_META, PROMPTS_TENSORS, SCHEMA_VERSION, STORE_META, STORE_TENSORS,
                            TEXT_PROMPTED_ONNX, TEXT_ZERO_SHOT_ONNX, TOKENIZER_DIR, version_name)
from runtime.preprocess import Preprocess

from . import onnx_export as ox
from .quantize import to_fp16, to_int8, top1_agreement

FORMATS = ("onnx", "tensorrt", "triton")
PRECISIONS = ("fp32", "fp16", "int8")
TRITON_PLATFORMS = ("onnxruntime", "tensorrt")  # what Triton runs: the ONNX graph, or a TensorRT plan
# The options each format reads (beside the run and --out). One a format would ignore is refused instead
# of silently dropped: `--format onnx --triton-platform tensorrt` builds no TensorRT plan.
FORMAT_ARGS = {
    "onnx": ("precision", "max_batch", "min_agreement", "text"),
    "tensorrt": ("precision", "max_batch", "min_agreement", "text"),
    "triton": ("precision", "max_batch", "min_agreement", "text", "triton_platform"),
}
# Least top-1 agreement with the fp32 graph on the test split before a reduced-precision export is refused.
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.99, "int8": 0.95}
CHECK_IMAGES = 1024  # at most this many test images for the checks, calibration likewise from train
HEAD_FILES = (HEAD_TENSORS, HEAD_META, STORE_TENSORS, STORE_META, PROMPTS_TENSORS, PROMPTS_META)
TEMPLATE = "a photo of a {}"  # = cgil.text.TextEncoder.zero_shot's default


def _subset(items: list, labels: np.ndarray, limit: int) -> list:
    """A deterministic, class-balanced-enough subset: every k-th item."""
    step = max(1, -(-len(items) // limit))
    return items[::step]


def _pixels(pre: Preprocess, items: list) -> np.ndarray:
    return pre.batch([load_image(x) for x in items])


def _bpe_tokenizer(clip: FrozenClip) -> Optional[dict[str, Any]]:
    """The tokenizer facts the torch-free runtime needs, or None if it is not open_clip's CLIP BPE."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower, default_bpe

    tok = clip.tokenizer
    if type(tok) is not SimpleTokenizer or tok.clean_fn is not _clean_lower or tok.reduction_fn is not None:
        return None
    return {"source": default_bpe(), "context_length": int(tok.context_length),
            "sot": int(tok.sot_token_id), "eot": int(tok.eot_token_id)}


def _embed_ort(path: Path, pixels: np.ndarray, precision: str) -> np.ndarray:
    from runtime.backends import OnnxRuntimeImage

    backend = OnnxRuntimeImage(path, ["CPUExecutionProvider"], precision)
    # batch 1, then 64s, then a remainder: the dynamic batch axis is exercised at several sizes
    bounds = [0, 1] + list(range(65, len(pixels), 64)) + [len(pixels)]
    return np.concatenate([backend.embed(pixels[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a])


def _embed_torch(graph: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([graph(torch.from_numpy(pixels[i:i + 64])) for i in range(0, len(pixels), 64)]).numpy()


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_format_args(format: str, given: dict[str, Any]) -> None:
    """Refuse options (those of FORMAT_ARGS, away from their defaults) that `format` would ignore."""
    ignored = [name for name in given if name not in FORMAT_ARGS[format]]
    if ignored:
        raise CgilError(f"{', '.join(map(_option, ignored))} does not apply to --format {format} "
                        f"(it takes {', '.join(map(_option, FORMAT_ARGS[format]))})")


def export_bundle(run_dir: Path, out: Path, format: str = "onnx", precision: str = "fp32", max_batch: int = 32,
                  force: bool = False, min_agreement: Optional[float] = None, text: bool = True,
                  report: Callable[[str], None] = lambda s: None, triton_platform: str = "onnxruntime") -> dict[str, Any]:
    """Export RUN's current state to the bundle folder OUT; returns the bundle manifest.

    text=False leaves out the text graphs and tokenizer (a device that never adds class names).
    triton_platform="tensorrt" (with format="triton"): the Triton repository holds a TensorRT plan,
    built and gated as for format="tensorrt"; the bundle keeps image.onnx for the runtime's own backends.
    """
    run_dir, out = Path(run_dir), Path(out)
    if format not in FORMATS:
        raise CgilError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise CgilError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if not 1 <= max_batch <= 4096:
        raise CgilError(f"--max-batch must be between 1 and 4096, got {max_batch}")
    if out.exists() and any(out.iterdir()) and not force:
        raise CgilError(f"{out} exists and is not empty; pass --force to replace it")
    if triton_platform not in TRITON_PLATFORMS:
        raise CgilError(f"unknown Triton platform {triton_platform!r}; choose one of: {', '.join(TRITON_PLATFORMS)}")
    defaults = {k: p.default for k, p in inspect.signature(export_bundle).parameters.items()}
    chosen = dict(precision=precision, max_batch=max_batch, min_agreement=min_agreement, text=text,
                  triton_platform=triton_platform)
    check_format_args(format, {k: v for k, v in chosen.items() if v != defaults[k]})
    trt = format == "tensorrt" or (format == "triton" and triton_platform == "tensorrt")
    if min_agreement is not None and precision == "fp32" and not trt:
        raise CgilError("--min-agreement does not apply to an fp32 ONNX graph (checked by cosine against PyTorch); "
                        "it gates fp16/int8 graphs and TensorRT engines")
    if trt:
        from runtime.tensorrt_build import require_tensorrt

        require_tensorrt()  # fail before minutes of export work, not after

    config, state = open_run(run_dir)
    verify_manifest(state)
    cfg = TrainConfig.from_dict(config["settings"])
    clip = create_clip(cfg.model, cfg.pretrained, "cpu", cfg.model_seed)
    head_meta = read_json(state / "head.json")
    check_identity(head_meta["model"], clip, state)
    learner, _ = load_learner(state, clip)
    preprocess = preprocess_config(clip)
    pre = Preprocess.from_config(preprocess)
    ds = get_dataset(cfg.dataset, cfg.data_dir, val_split=cfg.val_split)
    test_pixels = _pixels(pre, _subset(ds.test.items, ds.test.labels, CHECK_IMAGES))
    keys = load_tensors(state / "head.safetensors")["keys"].float().numpy()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        checks: dict[str, Any] = {}
        report(f"exporting the image path of {cfg.model} ({len(test_pixels)} test images for the checks)")
        graph = ox.ImageGraph(clip.model, preprocess["mean"], preprocess["std"]).eval()
        reference = _embed_torch(graph, test_pixels)
        fp32_path = tmp / "image.fp32.onnx"

        def image_fp32(exporter: str) -> tuple[np.ndarray, float]:
            ox.export_image(clip, preprocess, fp32_path, exporter=exporter)
            out = _embed_ort(fp32_path, test_pixels, "fp32")
            cosine = ox.min_cosine(out, reference)
            ox.require_cosine(f"image graph (fp32, {exporter} exporter)", cosine)
            return out, cosine

        try:
            fp32, cos, exporter = *image_fp32("torchscript"), "torchscript"
        except Exception as e:  # an architecture the tracer gets wrong: torch.export keeps axes symbolic
            report(f"  the traced image graph failed its check ({str(e).splitlines()[0]}); exporting with torch.export")
            fp32, cos, exporter = *image_fp32("dynamo"), "dynamo"
        checks["image_fp32"] = {"min_cosine_vs_torch": cos, "top1_agreement_vs_torch": top1_agreement(reference, fp32, keys),
                                "images": len(test_pixels), "exporter": exporter}
        report(f"  fp32 image graph: min cosine vs PyTorch {cos:.6f}")

        image_path = tmp / "image.onnx"
        if precision == "fp32":
            fp32_path.rename(image_path)
        else:
            if precision == "fp16":
                to_fp16(fp32_path, image_path)
            else:
                train_items = _subset(ds.train.items, ds.train.labels, CHECK_IMAGES)
                report(f"  calibrating int8 on {len(train_items)} training images")
                calib = _pixels(pre, train_items)
                to_int8(fp32_path, image_path, [calib[i:i + 32] for i in range(0, len(calib), 32)],
                        target="tensorrt" if trt else "cpu")
            low = _embed_ort(image_path, test_pixels, precision)
            agreement = top1_agreement(fp32, low, keys)
            checks[f"image_{precision}"] = {"top1_agreement_vs_fp32": agreement,
                                            "min_cosine_vs_fp32": ox.min_cosine(low, fp32),
                                            "images": len(test_pixels)}
            report(f"  {precision} image graph: top-1 agreement with fp32 {agreement:.2%}, "
                   f"min cosine {checks[f'image_{precision}']['min_cosine_vs_fp32']:.5f}")
            needed = MIN_AGREEMENT[precision] if min_agreement is None else min_agreement
            if agreement < needed:
                raise CgilError(f"{precision} export refused: top-1 agreement with fp32 {agreement:.2%} < {needed:.0%}")
            fp32_path.unlink()

        text = _export_text(clip, learner, tmp, checks, report) if text else None
        engine: dict[str, Any] = {"image": IMAGE_ONNX}
        if precision == "int8":  # which int8 graph image.onnx is: the runtime's TensorRT backend reads it
            engine["int8"] = "tensorrt" if trt else "cpu"
        h, w = preprocess["size"]
        plan = None
        if trt:
            from runtime.tensorrt_build import build_engine

            from .tensorrt_check import require_tensorrt_compatible

            require_tensorrt_compatible(image_path)  # a readable reason instead of a parser error log
            report(f"  building a TensorRT {precision} engine (batch 1..{max_batch})")
            plan, key = build_engine(image_path, precision, (h, w), max_batch)
            checks["tensorrt"] = check_engine(plan, (h, w), clip.identity.embed_dim, max_batch, precision,
                                              test_pixels, fp32, keys, min_agreement)
            report(f"  TensorRT {precision} engine: min cosine vs ONNX fp32 {checks['tensorrt']['min_cosine_vs_fp32']:.5f}, "
                   f"top-1 agreement {checks['tensorrt']['top1_agreement_vs_fp32']:.2%}")
        if format == "tensorrt":
            (tmp / "tensorrt").mkdir()
            (tmp / "tensorrt" / "image.plan").write_bytes(plan)
            engine["tensorrt"] = {"plan": "tensorrt/image.plan", "key": key}
        if format == "triton" and plan is not None:
            from .triton import write_repository

            write_repository(tmp / "triton", plan, (h, w), clip.identity.embed_dim, max_batch, tensorrt=True)
            engine["triton"] = {"repository": "triton", "model": "cgil_image", "platform": "tensorrt_plan", "key": key}
        elif format == "triton":
            from .triton import write_repository

            model_file = write_repository(tmp / "triton", image_path.read_bytes(), (h, w), clip.identity.embed_dim, max_batch)
            image_path.unlink()  # one copy only: the runtime reads the model inside the Triton repository
            engine = {"image": str(model_file.relative_to(tmp)), "triton": {"repository": "triton", "model": "cgil_image"}}

        head_dir = _publish_head(state, learner, tmp, clip, cfg.align.to_dict(), training_images(ds))
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file() and p.relative_to(tmp).parts[0] != HEADS_DIR}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": BUNDLE_KIND,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "format": format,
            "precision": precision,
            "max_batch": max_batch,
            "model": clip.identity.to_dict(),
            "preprocess": preprocess,
            "logit_scale": float(clip.logit_scale),
            "engine": engine,
            "text": text,
            "head": {"version_dir": f"{HEADS_DIR}/{head_dir.name}", "head_version": head_meta["head_version"],
                     "class_names": head_meta["class_names"],
                     "future_class_names": head_meta.get("future_class_names", [])},
            "checks": checks,
            "source": {"run": str(run_dir.resolve()), "state_version": state.name},
            "files": files,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        open_bundle(tmp)  # re-read exactly as a device will: every sha256, the head's model identity
        load_head(tmp, manifest["model"])
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"bundle written to {out}")
    return manifest


# Least cosine of a TensorRT engine's embeddings with the fp32 ONNX graph's, per precision. int8 is
# gated by top-1 agreement alone (as the int8 ONNX graph is): its cosines vary with calibration.
ENGINE_MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}


def check_engine(plan: bytes, image_hw: tuple[int, int], embed_dim: int, max_batch: int, precision: str,
                 pixels: np.ndarray, fp32: np.ndarray, keys: np.ndarray, min_agreement: Optional[float] = None) -> dict:
    """Run a freshly built TensorRT engine on the test images: the same gates as the ONNX graphs."""
    from runtime.tensorrt_backend import TensorRTEngine

    out = TensorRTEngine(plan, image_hw, embed_dim, max_batch).embed_all(pixels)
    return gate_engine(precision, out, fp32, keys, min_agreement)


def gate_engine(precision: str, out: np.ndarray, fp32: np.ndarray, keys: np.ndarray,
                min_agreement: Optional[float] = None) -> dict:
    """The check record of an engine's embeddings `out` against the fp32 ONNX graph's; CgilError if refused."""
    check = {"min_cosine_vs_fp32": ox.min_cosine(out, fp32), "top1_agreement_vs_fp32": top1_agreement(fp32, out, keys),
             "images": len(out)}
    least = ENGINE_MIN_COSINE.get(precision)
    if least is not None and not check["min_cosine_vs_fp32"] >= least:  # also catches NaN
        raise CgilError(f"TensorRT {precision} engine refused: min cosine with the fp32 ONNX graph "
                        f"{check['min_cosine_vs_fp32']:.6f} < {least}")
    needed = MIN_AGREEMENT[precision] if min_agreement is None else min_agreement
    if not check["top1_agreement_vs_fp32"] >= needed:
        raise CgilError(f"TensorRT {precision} engine refused: top-1 agreement with fp32 "
                        f"{check['top1_agreement_vs_fp32']:.2%} < {needed:.0%}")
    return check


def _export_text(clip: FrozenClip, learner, tmp: Path, checks: dict, report) -> Optional[dict[str, Any]]:
    tok = _bpe_tokenizer(clip)
    if tok is None:
        report("  no text graphs: the model's tokenizer is not open_clip's CLIP BPE")
        return None
    try:
        checks.update(_text_graphs(clip, learner, tmp, tok["eot"], "torchscript"))
    except Exception as e:  # e.g. a text tower whose attention the tracer fixes to one length
        report(f"  the traced text graphs failed their check ({str(e).splitlines()[0]}); exporting with torch.export")
        checks.update(_text_graphs(clip, learner, tmp, tok["eot"], "dynamo"))
    report(f"  text graphs: min cosine vs PyTorch {checks['text_zero_shot']['min_cosine_vs_torch']:.6f} (zero-shot), "
           f"{checks.get('text_prompted', {}).get('min_cosine_vs_torch', float('nan')):.6f} (prompted)")
    vocab = tmp / TOKENIZER_DIR / Path(tok["source"]).name
    vocab.parent.mkdir()
    shutil.copyfile(tok["source"], vocab)
    return {"zero_shot": TEXT_ZERO_SHOT_ONNX, "prompted": TEXT_PROMPTED_ONNX, "template": TEMPLATE,
            "tokenizer": {"kind": "clip-bpe", "vocab": str(vocab.relative_to(tmp)), "context_length": tok["context_length"],
                          "sot": tok["sot"], "eot": tok["eot"]}}


def _text_graphs(clip: FrozenClip, learner, tmp: Path, eot: int, exporter: str) -> dict[str, Any]:
    """Export both text graphs and check them against the learner at lengths the exporter did not trace."""
    prompts = learner.prompts
    names = list(prompts.class_names) or ["object"]
    context = ox.prompt_context(learner)
    tokens = prompts.tokens.cpu()
    ox.export_text(clip, eot, tokens if len(tokens) else clip.tokenizer(["X X object."]), context if len(context) else
                   torch.zeros(1, prompts.n_ctx + 1, prompts.text.tower.width), tmp / TEXT_ZERO_SHOT_ONNX,
                   tmp / TEXT_PROMPTED_ONNX, exporter=exporter)
    zs_session, pr_session = ox.ort_session(tmp / TEXT_ZERO_SHOT_ONNX), ox.ort_session(tmp / TEXT_PROMPTED_ONNX)
    probe = names + ["a much longer class name, to run the graph at an untraced length"]
    zs_tokens = ox.truncate_tokens(clip.tokenizer([TEMPLATE.format(n) for n in probe]), eot)
    zs = zs_session.run(None, {ox.TOKENS: zs_tokens.numpy()})[0]
    with torch.no_grad():
        zs_ref = prompts.text.zero_shot(probe).numpy()
    checks = {"text_zero_shot": {"min_cosine_vs_torch": ox.min_cosine(zs, zs_ref), "texts": len(probe), "exporter": exporter}}
    ox.require_cosine("zero-shot text graph", checks["text_zero_shot"]["min_cosine_vs_torch"])
    if len(tokens):
        keys = pr_session.run(None, {ox.CONTEXT: context.numpy(), ox.TOKENS: ox.truncate_tokens(tokens, eot).numpy()})[0]
        with torch.no_grad():
            ref = prompts.keys().float().numpy()
        checks["text_prompted"] = {"min_cosine_vs_torch": ox.min_cosine(keys, ref), "classes": len(ref), "exporter": exporter}
        ox.require_cosine("prompted text graph", checks["text_prompted"]["min_cosine_vs_torch"])
    return checks


def training_images(ds) -> dict[str, dict[str, int]]:
    """Per class id: the training images it was learned from and, for image files, their bytes on disk
    (what `cgil store info` sets the replay store against; an update records the same for its classes)."""
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for item, label in zip(ds.train.items, ds.train.labels.tolist()):
        counts[str(label)] = counts.get(str(label), 0) + 1
        if isinstance(item, (str, Path)):
            sizes[str(label)] = sizes.get(str(label), 0) + Path(item).stat().st_size
    return {"images": counts, "image_bytes": sizes if len(sizes) == len(counts) else {}}


def _publish_head(state: Path, learner, tmp: Path, clip: FrozenClip, align: dict[str, Any],
                  images: dict[str, dict[str, int]]) -> Path:
    """heads/head-NNNN: the run's head, replay store and prompts, plus the prompted graph's inputs.

    head.json records the run's alignment settings (the generator's are in store.json), so that
    `cgil update` realigns with what the run used unless told otherwise. store.json records each
    group's training images per class (`images`, `image_bytes`), as an update does for its classes.
    """
    meta = read_json(state / "head.json")

    def write(d: Path) -> None:
        for name in HEAD_FILES:
            if (state / name).exists():
                shutil.copyfile(state / name, d / name)
        if (state / STORE_META).exists():
            store = read_json(state / STORE_META)
            for group in store.get("groups", []):
                for key, per_class in images.items():
                    group[key] = {str(c): per_class[str(c)] for c in group["class_ids"] if str(c) in per_class}
            atomic_write_json(d / STORE_META, store)
        atomic_write_json(d / HEAD_META, {**meta, "align": meta.get("align") or align})
        save_tensors(d / PROMPT_CONTEXT,
                     {"context": ox.prompt_context(learner), "tokens": learner.prompts.tokens.cpu()})

    return publish_version(tmp / HEADS_DIR, version_name(int(meta["head_version"])), write, kind=HEAD_KIND,
                           extra={"model": clip.identity.to_dict()})


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished bundle into place; an existing one (only with --force) is moved aside first."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
