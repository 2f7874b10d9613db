"""The lean text path (cgil/text_blocks.py) and the flat AdamW buffer (cgil/learner.py: FlatParameters) make the
alignment step cheaper without changing a bit: keys, gradients and trained heads equal the module path's."""
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

import cgil.learner
from cgil.learner import Learner
from cgil.text import TextTower, encode_embeds
from cgil.text_blocks import lean_blocks
from conftest import tiny_learner

NAMES = ["zero", "a rather long class name with many words", "seven", "traffic light", "one", "dog", "fire truck",
         "naïve café", "x", "the last of ten"]


def make_learner(count: int, epochs: int = 2) -> Learner:
    return tiny_learner(NAMES[:count], epochs)


def keys_and_grads(prompts, lean: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    prompts.text.lean = lean
    prompts.zero_grad(set_to_none=True)
    keys = prompts.keys()
    weights = torch.randn(keys.shape, generator=torch.Generator().manual_seed(5))
    (keys * weights).sum().backward()
    return keys.detach(), [p.grad.clone() for p in prompts.trainable_parameters()]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 10])  # below 4 prompts the EOT rows are padded (MIN_ROWS)
def test_lean_keys_and_gradients_equal_the_module_path_bit_for_bit(count):
    prompts = make_learner(count).prompts
    assert lean_blocks(prompts.text.tower.transformer, torch.zeros(count, 8, 64), prompts.text.tower.attn_mask)
    fast, fast_grads = keys_and_grads(prompts, lean=True)
    slow, slow_grads = keys_and_grads(prompts, lean=False)
    assert torch.equal(fast, slow)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, slow_grads))
    assert all(g.abs().sum() > 0 for g in fast_grads)  # every tensor got a real gradient


def other_tower(batch_first: bool = True) -> TextTransformer:
    """Not cgil-tiny: 3 heads of 16, 3 layers, LayerScale, QuickGELU, fp32 LayerNorm, MLP ratio 2, a bias-free
    projection; sequence-first blocks when batch_first is False."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        text = TextTransformer(context_length=20, vocab_size=100, width=48, heads=3, layers=3, mlp_ratio=2.0,
                               ls_init_value=0.5, output_dim=32, act_layer=QuickGELU,
                               norm_layer=open_clip.transformer.LayerNormFp32)
        text.init_parameters()
    if not batch_first:
        text.transformer.batch_first = False
        for block in text.transformer.resblocks:
            block.attn.batch_first = False
    return text.eval().requires_grad_(False)


def lean_and_module(tower: TextTower, count: int, length: int):
    g = torch.Generator().manual_seed(count)
    embeds = torch.randn(count, length, tower.width, generator=g, requires_grad=True)
    eot = torch.randint(0, length, (count,), generator=g)
    out = []
    for lean in (True, False):
        embeds.grad = None
        keys = encode_embeds(tower, embeds, eot, lean=lean)
        (keys * torch.randn(keys.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        out.append((keys.detach(), embeds.grad.clone()))
    return out


@pytest.mark.parametrize("batch_first", [True, False])
def test_lean_path_equals_the_module_on_another_text_tower(batch_first):
    tower = TextTower.of(other_tower(batch_first))
    assert isinstance(tower.transformer.resblocks[0].ls_1, open_clip.transformer.LayerScale)
    assert lean_blocks(tower.transformer, torch.zeros(2, 9, 48), tower.attn_mask) is not None
    for count, length in [(1, 9), (2, 5), (6, 9), (13, 17)]:
        (fast, fast_grad), (slow, slow_grad) = lean_and_module(tower, count, length)
        assert torch.equal(fast, slow) and torch.equal(fast_grad, slow_grad)
        assert fast.shape == (count, 32)


def test_blocks_it_does_not_recognise_take_the_module_forward():
    tower = TextTower.of(other_tower())
    x, mask = torch.zeros(4, 9, 48), tower.attn_mask
    assert lean_blocks(tower.transformer, x, mask) is not None
    with torch.random.fork_rng(devices=[]):
        custom = TextTransformer(context_length=20, vocab_size=100, width=48, heads=3, layers=2, output_dim=32,
                                 block_type="custom")
    assert lean_blocks(custom.transformer, x, mask) is None  # CustomResidualAttentionBlock
    assert lean_blocks(tower.transformer, x, mask > 0) is None  # a boolean mask
    assert lean_blocks(tower.transformer, x[:1, :3], mask) is None  # fewer than MIN_ROWS rows in all
    handle = tower.transformer.resblocks[1].mlp.register_forward_hook(lambda *a: None)
    assert lean_blocks(tower.transformer, x, mask) is None  # a hook the lean path would skip
    handle.remove()
    tower.transformer.grad_checkpointing = True
    assert lean_blocks(tower.transformer, x, mask) is None
    tower.transformer.grad_checkpointing = False
    tower.transformer.resblocks[0].attn.dropout = 0.1
    assert lean_blocks(tower.transformer, x, mask) is None
    tower.transformer.resblocks[0].attn.dropout = 0.0

    # an unrecognised block still gives the module's numbers: encode_embeds ran the module forward
    class Wrapped(nn.MultiheadAttention):
        pass

    old = tower.transformer.resblocks[2].attn
    wrapped = Wrapped(48, 3, batch_first=True)
    wrapped.load_state_dict(old.state_dict())
    tower.transformer.resblocks[2].attn = wrapped
    assert lean_blocks(tower.transformer, x, mask) is None
    (fast, fast_grad), (slow, slow_grad) = lean_and_module(tower, 5, 9)
    assert torch.equal(fast, slow) and torch.equal(fast_grad, slow_grad)


def test_flat_buffer_and_lean_path_align_exactly_like_before(monkeypatch):
    g = torch.Generator().manual_seed(0)
    feats, ids = torch.randn(96, 64, generator=g), torch.arange(96) % 5
    fast = make_learner(5)
    fast.align(Learner.real_source(feats, ids), seed=3)
    with monkeypatch.context() as m:
        unflattened = cgil.learner.FlatParameters  # the optimizer over the 15 separate tensors, as before
        m.setattr(cgil.learner, "FlatParameters", lambda params, flatten: unflattened(params, flatten=False))
        before = make_learner(5)
        before.text.lean = False
        before.align(Learner.real_source(feats, ids), seed=3)
    assert torch.equal(fast.head(), before.head())
    assert not torch.equal(fast.head(), make_learner(5).head())  # it trained
    fast_state, before_state = fast.prompts.learned_state(), before.prompts.learned_state()
    assert all(torch.equal(fast_state[k], before_state[k]) for k in before_state)
    # after align every tensor owns its storage again: a saved state does not carry the whole flat buffer
    for p in fast.prompts.trainable_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_a_blas_whose_rows_depend_on_the_row_count_is_caught():
    """The lean path's exactness rests on the BLAS giving a row the same bits in a short product as in a long
    one; a product computed another way below 8 rows (as MKL does below 4) must fail the check."""
    import torch.nn.functional as F

    from cgil.text_blocks import rows_exact

    def short_products_differ(x, w, b=None):
        if x.shape[0] >= 8:
            return F.linear(x, w, b)
        return F.linear(x.double(), w.double(), None if b is None else b.double()).float()

    assert rows_exact(16, 96, 64, 256, torch.float32)  # this machine's BLAS, as the lean path uses it
    assert not rows_exact(4, 96, 64, 256, torch.float32, linear=short_products_differ)
    assert rows_exact(16, 96, 64, 256, torch.float32, linear=short_products_differ)


def test_the_module_forward_runs_where_the_row_check_fails(monkeypatch):
    import cgil.text_blocks

    prompts = make_learner(5).prompts
    x = torch.zeros(5, 8, 64)
    assert lean_blocks(prompts.text.tower.transformer, x, prompts.text.tower.attn_mask) is not None
    monkeypatch.setattr(cgil.text_blocks, "rows_exact", lambda *args, **kwargs: False)
    monkeypatch.setattr(cgil.text_blocks, "_EXACT", cgil.text_blocks.weakref.WeakKeyDictionary())
    assert lean_blocks(prompts.text.tower.transformer, x, prompts.text.tower.attn_mask) is None
    fast, fast_grads = keys_and_grads(prompts, lean=True)  # asked for lean, ran the module forward
    slow, slow_grads = keys_and_grads(prompts, lean=False)
    assert torch.equal(fast, slow) and all(torch.equal(a, b) for a, b in zip(fast_grads, slow_grads))
