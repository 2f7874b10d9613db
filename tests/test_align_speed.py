"""Alignment step overhead (issue 19): the frozen part of the prompts is computed once, the optimizer runs
foreach, and neither changes a bit of the result."""
import torch

from cgil.learner import Learner
from cgil.text import normalize
from conftest import tiny_learner

NAMES = ["zero", "a rather long class name with many words", "seven", "traffic light", "one"]


def make_learner(names=NAMES, epochs=2) -> Learner:
    return tiny_learner(names, epochs)


def keys_recomputed(prompts, rows=slice(None)) -> torch.Tensor:
    """The keys as computed before the cache: every step re-embeds all 77 tokens of every prompt."""
    tokens = prompts.tokens[rows]
    embeds = prompts.text.embed_tokens(tokens)
    g = prompts.generator(prompts.zero_shot[rows]).unsqueeze(1)
    embeds = torch.cat([embeds[:, :1], prompts.ctx[rows], g, embeds[:, 2 + prompts.n_ctx:]], dim=1)
    longest = int(prompts.text.eot_positions(tokens).max())
    return normalize(prompts.text(embeds, prompts.text.eot_positions(tokens), longest))


def test_frozen_token_embeddings_are_computed_once_per_class_set():
    learner = make_learner()
    calls = []
    embed = learner.text.embed_tokens
    learner.text.embed_tokens = lambda tokens: calls.append(tuple(tokens.shape)) or embed(tokens)
    g = torch.Generator().manual_seed(0)
    feats, ids = torch.randn(80, 64, generator=g), torch.arange(80) % len(NAMES)
    learner.align(Learner.real_source(feats, ids), seed=0)  # 2 epochs x 5 steps
    assert calls == [(len(NAMES), 77)]
    learner.add_classes([5], ["nine"], seed=2)  # (its zero-shot text embeds "a photo of a nine" once)
    calls.clear()
    learner.align(Learner.real_source(feats, ids), seed=0)  # a new class set: its prompts embedded once
    assert calls == [(len(NAMES) + 1, 77)]


def test_cached_keys_equal_recomputed_keys_bit_for_bit():
    learner = make_learner()
    prompts = learner.prompts
    with torch.no_grad():
        assert torch.equal(prompts.keys(), keys_recomputed(prompts))
        rows = torch.tensor([3, 0])
        assert torch.equal(prompts.keys(rows), keys_recomputed(prompts, rows))
    # gradients too: the cache holds only the frozen part
    prompts.keys().sum().backward()
    cached = [p.grad.clone() for p in prompts.trainable_parameters()]
    prompts.zero_grad()
    keys_recomputed(prompts).sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(cached, prompts.trainable_parameters()))


def test_foreach_adamw_aligns_exactly_like_the_per_tensor_loop(monkeypatch):
    g = torch.Generator().manual_seed(0)
    feats, ids = torch.randn(80, 64, generator=g), torch.arange(80) % len(NAMES)
    fast = make_learner()
    fast.align(Learner.real_source(feats, ids), seed=3)
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: adamw(*a, **{**k, "foreach": False}))
    loop = make_learner()
    loop.align(Learner.real_source(feats, ids), seed=3)
    assert torch.equal(fast.head(), loop.head())
    assert not torch.equal(fast.head(), make_learner().head())  # it trained


def test_loading_other_prompts_in_place_refreshes_the_cache():
    other = make_learner(["cat", "a rather long class name with many birds", "dog", "traffic jam", "two"]).prompts
    prompts = make_learner().prompts
    assert prompts.eot_on_host == other.eot_on_host  # (kept on the host by add_classes, not in the state dict)
    with torch.no_grad():
        prompts.keys()  # fills the cache with this learner's tokens
        prompts.load_state_dict(other.state_dict())  # same shapes: tokens are copied into the same tensor
        assert torch.equal(prompts.keys(), keys_recomputed(other))
