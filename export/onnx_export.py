"""The prompted CLIP image and text paths as ONNX graphs.

Three graphs, each with a dynamic batch axis and opset 18 (>= 17, so TensorRT keeps
LayerNormalization as one layer):

* image:      uint8 pixels (N, H, W, 3), already resized/cropped  ->  L2-normalised embedding (N, D).
              Scaling to [0, 1] and the mean/std normalisation are folded into the graph, so a
              device only has to resize and crop.
* zero-shot:  token ids (N, L)  ->  unnormalised text embedding (N, D) (z_c of the spec), so a
              device can add class names without torch.
* prompted:   learned context (N, n_ctx + 1, W) + token ids (N, L)  ->  L2-normalised key (N, D).

The text graphs take tokens already truncated to the batch's longest EOT position + 1, exactly as
`cgil.text.TextEncoder` does (the text transformer is causal, so this is exact); L is a dynamic axis.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from cgil.clip import FrozenClip
from runtime.errors import CgilError
from cgil.text import TextTower, encode_embeds
from runtime.format import CONTEXT, IMAGE_INPUT, IMAGE_OUTPUT, KEY_OUTPUT, TEXT_OUTPUT, TOKENS  # noqa: F401

OPSET = 18
MIN_COSINE = 0.9999


class ImageGraph(nn.Module):
    """uint8 NHWC pixels -> normalised CLIP image embedding; (x/255 - mean)/std folded into one FMA."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
        self.register_buffer("shift", (mean_t / std_t).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Cast before the transpose: TensorRT accepts uint8 only as a network input/output, so the
        # first op on the pixels must be the cast (a uint8 Transpose is rejected by its ONNX parser).
        x = pixels.float().permute(0, 3, 1, 2) * self.scale - self.shift
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


class TraceableAttention(nn.Module):
    """nn.MultiheadAttention (self-attention) with reshapes that keep the sequence axis symbolic.

    torch's fused MHA bakes the traced sequence length into its reshapes, so the TorchScript
    exporter would fix the text graphs' length. Same weights, same math (scaled dot product with
    an additive causal mask), written with -1 reshapes.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not getattr(mha, "_qkv_same_embed_dim", True) or mha.in_proj_weight is None:
            raise CgilError("text attention with separate q/k/v projections is not supported for export")
        self.heads = mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, W)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.head_dim)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _traceable(transformer: nn.Module) -> nn.Module:
    """A copy of the text transformer whose attention modules keep the length axis dynamic."""
    import copy

    transformer = copy.deepcopy(transformer)
    for module in list(transformer.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, TraceableAttention(child))
    return transformer


class _TextGraph(nn.Module):
    """The text tower up to the EOT token, for tokens already truncated by the caller."""

    def __init__(self, model: nn.Module, eot_id: int):
        super().__init__()
        tower = TextTower.of(model)
        self.token_embedding = tower.token_embedding
        self.transformer = _traceable(tower.transformer)
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("positional_embedding", tower.positional_embedding.detach().clone())
        self.register_buffer("attn_mask", tower.attn_mask.detach().clone())
        self.eot_id = int(eot_id)

    def encode(self, token_embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The learner's text forward (cgil.text.encode_embeds) on this graph's traceable tower."""
        tower = TextTower(self.token_embedding, self.positional_embedding, self.transformer, self.ln_final,
                          self.text_projection, self.attn_mask)
        # lean=False: an exported graph is the module forward (the lean path's once-per-shape BLAS check and
        # EOT-row selection are for eager CPU training; TraceableAttention would also refuse it)
        return encode_embeds(tower, token_embeds, (tokens == self.eot_id).int().argmax(dim=-1), lean=False)


class ZeroShotTextGraph(_TextGraph):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode(self.token_embedding(tokens), tokens)


class PromptedTextGraph(_TextGraph):
    """[SOS] context_1..context_k name . [EOS]: the k = n_ctx + 1 learned vectors replace placeholder tokens."""

    def forward(self, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        embeds = self.token_embedding(tokens)
        k = context.shape[1]
        embeds = torch.cat([embeds[:, :1], context.to(embeds.dtype), embeds[:, 1 + k:]], dim=1)
        return F.normalize(self.encode(embeds, tokens), dim=-1)


def truncate_tokens(tokens: np.ndarray | torch.Tensor, eot_id: int):
    """Cut a (N, context_length) token batch after its longest EOT position, as the learner does."""
    length = int(((tokens == eot_id) * 1).argmax(-1).max()) + 1
    return tokens[:, :length]


def prompt_context(learner) -> torch.Tensor:
    """(C, n_ctx + 1, W): the learned vectors that replace the placeholders of each class prompt."""
    p = learner.prompts
    with torch.no_grad():
        g = p.generator(p.zero_shot).unsqueeze(1)
        return torch.cat([p.ctx.detach(), g.to(p.ctx.dtype)], dim=1).float().cpu()


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines and warnings for every call; keep the CLI readable."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic: dict[str, dict[int, str]], exporter: str = "dynamo") -> Path:
    """ONNX export, checked by onnx.checker. Callers verify the numbers (and the dynamic axes) on ORT.

    exporter="dynamo" (torch.export, the torch 2.14 default) keeps every dynamic axis symbolic by
    construction but takes 4-7 s per graph even for the tiny model; exporter="torchscript" takes
    0.3 s and is the default here. Its dynamic axes are trusted only because the export checks run
    batch sizes and sequence lengths other than the traced ones (and the text graphs swap torch's
    attention for TraceableAttention, whose reshapes keep the length symbolic). Both are tested.
    """
    module = module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "torchscript":
                with _no_mha_fastpath():  # the fused inference kernel has no ONNX symbolic
                    axes = {n: dict(a) for n, a in dynamic.items()}
                    axes.update({n: {0: "batch"} for n in output_names})
                    torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                      opset_version=OPSET, dynamo=False, dynamic_axes=axes)
            else:
                dims: dict[str, torch.export.Dim] = {}
                shapes = {name: {a: dims.setdefault(n, torch.export.Dim(n, min=1 if n == "batch" else 2, max=4096))
                                 for a, n in dynamic.get(name, {}).items()} or None for name in input_names}
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                  opset_version=OPSET, dynamo=True, external_data=False, dynamic_shapes=shapes)
    except CgilError:
        raise
    except Exception as e:  # the exporters raise many types; the user needs one line and the cause
        raise CgilError(f"ONNX export of {type(module).__name__} failed: {str(e).splitlines()[0]}") from e
    check_onnx(path)
    return path


@contextlib.contextmanager
def _no_mha_fastpath():
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def check_onnx(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise CgilError(f"{path.name} fails onnx.checker: {e}") from e


def export_image(clip: FrozenClip, preprocess: dict[str, Any], path: Path, exporter: str = "torchscript") -> Path:
    h, w = preprocess["size"]
    graph = ImageGraph(clip.model, preprocess["mean"], preprocess["std"])
    example = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    export_graph(graph, (example,), path, [IMAGE_INPUT], [IMAGE_OUTPUT], {IMAGE_INPUT: {0: "batch"}}, exporter=exporter)
    return shapes_after_the_cast(path)


def shapes_after_the_cast(path: Path) -> Path:
    """Read the pixels' shape from their float Cast, not from the uint8 input itself.

    torch.export writes a Shape on the uint8 input for the symbolic batch axis; TensorRT accepts uint8
    only as a network input feeding a Cast (export/tensorrt_check.py), and the Cast has the same shape.
    The Cast moves to the front of the node list (it reads only the input) so the graph stays sorted.
    """
    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    casts = [n for n in nodes if n.op_type == "Cast" and IMAGE_INPUT in n.input]
    readers = [n for n in nodes if n.op_type in ("Shape", "Size") and IMAGE_INPUT in n.input]
    if not casts or not readers:
        return path
    for node in readers:
        node.input[0] = casts[0].output[0]
    del model.graph.node[:]
    model.graph.node.extend(casts + [n for n in nodes if n not in casts])
    onnx.save(model, str(path))
    check_onnx(path)
    return path


def export_text(clip: FrozenClip, eot_id: int, example_tokens: torch.Tensor, context: torch.Tensor,
                zero_shot_path: Path, prompted_path: Path, exporter: str = "torchscript") -> None:
    # Traced one position longer than needed (a padding column after EOT changes nothing), so the
    # checks, which run at the needed length, exercise a length the tracer never saw.
    tokens = example_tokens[:, : truncate_tokens(example_tokens, eot_id).shape[1] + 1]
    axes = {0: "batch", 1: "length"}
    export_graph(ZeroShotTextGraph(clip.model, eot_id), (tokens,), zero_shot_path, [TOKENS], [TEXT_OUTPUT],
                 {TOKENS: axes}, exporter=exporter)
    export_graph(PromptedTextGraph(clip.model, eot_id), (context, tokens), prompted_path, [CONTEXT, TOKENS],
                 [KEY_OUTPUT], {CONTEXT: {0: "batch"}, TOKENS: axes}, exporter=exporter)


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return float((a * b).sum(-1).min())


def require_cosine(name: str, cosine: float, minimum: float = MIN_COSINE) -> None:
    if not cosine >= minimum:  # also catches NaN
        raise CgilError(f"{name}: ONNX Runtime disagrees with PyTorch (min cosine {cosine:.6f} < {minimum})")
