"""A lean forward of open_clip's text transformer up to the EOT read: the module's numbers, bit for bit, for less.

The learner reads the text transformer's output at one position per prompt (its EOT token). The module
forward computes the last block for every position and nn.MultiheadAttention wraps each attention in
checks and view chains. `run_to_eot` runs the same blocks through their own parameters and modules but:

- in the last block, everything after attention (out-projection, residual, ln_2, MLP) runs on the EOT
  rows only: those rows are the only ones read, and every op there works row by row;
- the packed in-projection is one 2-D GEMM over the batch-first rows instead of nn.MultiheadAttention's
  per-position batched GEMM over a sequence-first view, and attention reads q, k, v from it in place;
- nn.MultiheadAttention's checks are skipped.

Every kernel is the one ResidualAttentionBlock -> F.multi_head_attention_forward calls (its
scaled_dot_product_attention branch, taken with need_weights=False), on the same rows in another order or
layout. So keys and gradients equal the module path's to the bit wherever the BLAS computes each row of a
GEMM independently of how many rows it has: MKL does from MIN_ROWS rows up (measured on a 2-core AMD EPYC,
AVX512), and `rows_exact` checks it once per shape and process before the lean path runs, so a BLAS or CPU
without it takes the module forward. It runs on the CPU only, where that was checked; other devices,
tracing (the exporter), and every block it does not recognise (another block class such as
CustomResidualAttentionBlock or the exporter's TraceableAttention, cross-attention, bias_k/v, attention
dropout, hooks, gradient checkpointing, a boolean mask) take the module forward, unchanged.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, LayerNormFp32, LayerScale, ResidualAttentionBlock, Transformer
from torch import nn
from torch.nn.modules import module as _module

_NORMS = (LayerNorm, LayerNormFp32, nn.LayerNorm)
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)  # MHA's out_proj is the latter
_SCALES = (LayerScale, nn.Identity)


def _no_hooks(module: nn.Module) -> bool:
    """The lean path calls the attention's and the MLP's kernels directly, so it would skip their hooks."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _recognised(block: nn.Module, batch_first: bool) -> bool:
    # submodules read from _modules: nn.Module.__getattr__ would make this check cost ~2% of a cgil-tiny step
    parts = block._modules if type(block) is ResidualAttentionBlock else {}
    if set(parts) != {"ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"}:  # (cross-attention adds ln_1_kv)
        return False
    attn, mlp = parts["attn"], parts["mlp"]
    fc = mlp._modules if type(mlp) is nn.Sequential else {}
    if type(attn) is not nn.MultiheadAttention or list(fc) != ["c_fc", "gelu", "c_proj"]:
        return False
    return (attn.batch_first == batch_first and attn._qkv_same_embed_dim and attn.bias_k is None
            and attn.bias_v is None and not attn.add_zero_attn and attn.dropout == 0.0
            and attn._parameters.get("in_proj_weight") is not None and type(attn._modules["out_proj"]) in _LINEARS
            and type(parts["ln_1"]) in _NORMS and type(parts["ln_2"]) in _NORMS
            and type(parts["ls_1"]) in _SCALES and type(parts["ls_2"]) in _SCALES
            and type(fc["c_fc"]) is nn.Linear and type(fc["c_proj"]) is nn.Linear
            and all(map(_no_hooks, (block, attn, attn._modules["out_proj"], mlp, *parts.values(), *fc.values()))))


def lean_blocks(transformer: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[list]:
    """The blocks of `transformer` if `run_to_eot` reproduces its forward on `x` and `mask`, else None."""
    if (type(transformer) is not Transformer or transformer.grad_checkpointing or x.device.type != "cpu"
            or x.dim() != 3 or x.shape[0] * x.shape[1] < MIN_ROWS
            or mask is None or not mask.is_floating_point() or torch.jit.is_tracing() or not _no_hooks(transformer)
            or _module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return None
    blocks = list(transformer.resblocks)
    if not blocks or not all(_recognised(b, transformer.batch_first) for b in blocks):
        return None
    known = _EXACT.setdefault(transformer, {})  # per call this is a lookup: the step is overhead-bound
    key = (tuple(x.shape), x.dtype)
    if key not in known:
        known[key] = _products_exact(blocks, x.shape[0], x.shape[1], x.dtype)
    return blocks if known[key] else None


# transformer -> {(input shape, dtype): _products_exact}; weak, so a dropped model takes its entries with it
_EXACT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


# (rows, of rows, in features, out features, dtype) -> whether this process's BLAS gave those rows their bits
_CHECKED: dict[tuple, bool] = {}


def rows_exact(rows: int, total: int, k: int, n: int, dtype: torch.dtype, linear=F.linear) -> bool:
    """Whether `rows` rows of x W^T + b, and of the input gradient g W, come out with the same bits as the same
    rows of a `total`-row product (rows == total: the rows in another order). The lean path's exactness rests
    on it and MKL has it from MIN_ROWS rows up on the CPUs measured; instead of trusting that on every CPU and
    library, each shape is checked once per process on random data before the lean path uses it."""
    key = (rows, total, k, n, dtype)
    if linear is not F.linear:  # another product (the tests'): checked, not cached
        return _same_rows(rows, total, k, n, dtype, linear)
    if key not in _CHECKED:
        _CHECKED[key] = _same_rows(rows, total, k, n, dtype, linear)
    return _CHECKED[key]


def _same_rows(rows: int, total: int, k: int, n: int, dtype: torch.dtype, linear) -> bool:
    g = torch.Generator().manual_seed(rows * 7919 + total)
    x, w, b, grad = (torch.randn(shape, generator=g).to(dtype) for shape in ((total, k), (n, k), (n,), (total, n)))
    pick = (torch.randperm(total, generator=g) if rows == total
            else torch.linspace(0, total - 1, rows, dtype=torch.float64).round().long())
    return (torch.equal(linear(x, w, b)[pick], linear(x[pick], w, b))  # forward: x W^T + b
            and torch.equal(linear(grad, w.t())[pick], linear(grad[pick], w.t())))  # backward: g W


def _products_exact(blocks: list, count: int, length: int, dtype: torch.dtype) -> bool:
    """rows_exact for every product whose rows the lean path orders or selects differently from the module:
    the blocks' in-projection, out-projection and MLP over all count * length rows in another order, and the
    last block's out-projection and MLP over the EOT rows alone (padded to MIN_ROWS)."""
    total, eot_rows = count * length, max(count, MIN_ROWS)
    shapes = set()
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        shapes.add(tuple(attn.in_proj_weight.shape[::-1]))
        shapes.update(tuple(m.weight.shape[::-1]) for m in (attn.out_proj, mlp.c_fc, mlp.c_proj))
    last = blocks[-1]
    selected = {tuple(m.weight.shape[::-1]) for m in (last.attn.out_proj, last.mlp.c_fc, last.mlp.c_proj)}
    return (all(rows_exact(total, total, k, n, dtype) for k, n in sorted(shapes))
            and all(rows_exact(eot_rows, total, k, n, dtype) for k, n in sorted(selected) if eot_rows < total))


# The BLAS computes a GEMM of fewer rows than this with other kernels than a larger one (MKL: 1-3 rows differ
# in their last bits from the same rows of a larger product, measured), so no GEMM here has fewer rows than
# the module's own: with fewer prompts, the in-projection keeps the module's per-position batched form and
# the EOT rows are padded to this count.
MIN_ROWS = 4


def _attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor, pick: Optional[tuple]):
    """attn(x, x, x, attn_mask=mask, need_weights=False)[0]; only the rows `pick` = (prompts, positions)."""
    heads = attn.num_heads
    sequence_first = not attn.batch_first or x.shape[0] < MIN_ROWS
    if not sequence_first:  # one GEMM over the (N, L) rows, q, k, v read from it in place: no copies
        batch, length, width = x.shape
        proj = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(batch, length, 3, heads, width // heads)
        q, k, v = proj.permute(2, 0, 3, 1, 4).unbind(0)
    else:  # the module's own form: MHA runs sequence-first, (N, L, E) -> (L, N, E)
        if attn.batch_first:
            x = x.transpose(1, 0)
        length, batch, width = x.shape
        # F._in_projection_packed for q is k is v: one packed projection, split into contiguous q, k, v
        proj = F.linear(x.contiguous() if batch >= MIN_ROWS else x, attn.in_proj_weight, attn.in_proj_bias)
        proj = proj.unflatten(-1, (3, width)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        # (L, N, E) -> (N, heads, L, head_dim): the strides F.multi_head_attention_forward's view chain gives
        q, k, v = (proj[i].view(length, batch, heads, width // heads).permute(1, 2, 0, 3) for i in range(3))
    out = F.scaled_dot_product_attention(q, k, v, mask[None, None])  # every query: keys and values need them all
    if pick is not None:  # (R, heads, head_dim) -> (R, E): the same head-major rows F.mha_forward flattens
        out = out[pick[0], :, pick[1]].reshape(len(pick[0]), width)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    if not sequence_first:
        out = out.transpose(1, 2).reshape(batch * length, width)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias).view(batch, length, width)
    out = out.permute(2, 0, 1, 3).reshape(length * batch, width)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias).view(length, batch, width)
    return out.transpose(1, 0) if attn.batch_first else out


def run_to_eot(blocks: list, x: torch.Tensor, mask: torch.Tensor, eot: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """(N, E): Transformer.forward(x, attn_mask=mask)[arange(N), eot] for (N, L, E) x through `lean_blocks`."""
    count = x.shape[0]
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    mask = mask.to(x.dtype)
    prompts = torch.arange(count, device=x.device)
    if count < MIN_ROWS:  # padded with copies of prompt 0's EOT row, dropped at the end
        prompts = torch.cat([prompts, prompts.new_zeros(MIN_ROWS - count)])
        eot = torch.cat([eot, eot[:1].expand(MIN_ROWS - count)])
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        h = _attention(block.attn, block.ln_1(x), mask, (prompts, eot) if last else None)
        if last:
            x = x[prompts, eot] if batch_first else x[eot, prompts]
        x = x + (h if type(block.ls_1) is nn.Identity else block.ls_1(h))
        mlp = block.mlp
        h = F.linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias)
        h = F.linear(mlp.gelu(h), mlp.c_proj.weight, mlp.c_proj.bias)
        x = x + (h if type(block.ls_2) is nn.Identity else block.ls_2(h))
    return x[:count]
