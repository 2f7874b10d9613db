"""Text path and prompts: truncation is exact, zero-shot matches open_clip, only prompts learn."""
import pytest
import torch

from cgil.clip import create_clip
from cgil.generators import GeneratorConfig
from cgil.learner import AlignConfig, Learner
from cgil.prompts import PromptLearner
from cgil.text import TextEncoder

NAMES = ["zero", "a rather long class name with many words", "seven", "traffic light"]


@pytest.fixture(scope="module")
def clip():
    return create_clip("cgil-tiny", seed=0)


def prompts_for(clip, truncate: bool) -> PromptLearner:
    text = TextEncoder(clip.model, clip.tokenizer, truncate=truncate)
    learner = PromptLearner(text, clip.identity.embed_dim, n_ctx=2)
    torch.manual_seed(0)
    learner.add_classes(range(len(NAMES)), NAMES, torch.Generator().manual_seed(1))
    return learner


def test_truncated_prompted_keys_equal_full_length_keys(clip):
    short, full = prompts_for(clip, True), prompts_for(clip, False)
    full.load_state_dict(short.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(short.keys(), full.keys(), atol=1e-5, rtol=0)
    eot = short.text.eot_positions(short.tokens)
    assert int(eot.max()) + 1 < short.tokens.shape[1] // 2  # the saving is real: far fewer than 77 tokens


def test_zero_shot_embeddings_equal_open_clip_encode_text(clip):
    text = TextEncoder(clip.model, clip.tokenizer)
    ours = text.zero_shot(NAMES)
    tokens = clip.tokenizer([f"a photo of a {n}" for n in NAMES])
    with torch.no_grad():
        reference = clip.model.encode_text(tokens)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_prompts_and_context_generator(clip):
    learner = Learner(clip, GeneratorConfig(kind="gauss"), AlignConfig(epochs=1))
    learner.add_classes([0, 1, 2], NAMES[:3], seed=0)
    feats = torch.randn(12, clip.identity.embed_dim)
    labels = torch.tensor([0, 1, 2] * 4)
    logits = clip.logit_scale * torch.nn.functional.normalize(feats, dim=-1) @ learner.prompts.keys().t()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in clip.model.parameters())
    assert not any(p.requires_grad for p in clip.model.parameters())
    trainable = learner.prompts.trainable_parameters()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_context_generator_stays_in_eval_mode_so_keys_do_not_depend_on_the_batch(clip):
    learner = prompts_for(clip, True)
    learner.train()
    assert not learner.generator.training
    with torch.no_grad():
        all_keys = learner.keys()
        one = learner.keys(slice(1, 2))
    torch.testing.assert_close(all_keys[1:2], one, atol=1e-6, rtol=0)


def test_alignment_separates_classes_on_their_own_features(clip):
    """Prompts learn: after alignment on two well-separated feature clusters, keys classify them."""
    g = torch.Generator().manual_seed(0)
    d = clip.identity.embed_dim
    centers = torch.randn(2, d, generator=g)
    feats = torch.cat([centers[0] + 0.3 * torch.randn(64, d, generator=g), centers[1] + 0.3 * torch.randn(64, d, generator=g)])
    labels = torch.tensor([3] * 64 + [5] * 64)
    learner = Learner(clip, GeneratorConfig(kind="gauss"), AlignConfig(epochs=15, lr=0.05))
    learner.add_classes([3, 5], ["cat", "dog"], seed=0)
    learner.align(Learner.real_source(feats, labels), seed=0)
    pred = (torch.nn.functional.normalize(feats, dim=-1) @ learner.head().t()).argmax(1)
    assert (learner.columns(labels) == pred).float().mean() > 0.95


def reference_context_generator(in_dim: int, out_dim: int) -> torch.nn.Sequential:
    """The reference's g (models/cgil_utils/cgil_utils.py), as written there."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.SELU(True),
                         nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.SELU(True),
                         nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.SELU(True),
                         nn.Linear(out_dim, out_dim))


@pytest.mark.parametrize("embed_dim, width", [(48, 32), (32, 48), (40, 40)])
def test_context_generator_has_the_reference_widths_and_init(embed_dim, width):
    from cgil.prompts import ContextGenerator

    torch.manual_seed(0)
    ours = ContextGenerator(embed_dim, width)
    torch.manual_seed(0)
    ref = reference_context_generator(embed_dim, width).eval()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}
    z = torch.randn(5, embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(z), ref(z))


def test_a_context_generator_of_other_widths_is_refused_clearly(clip):
    from runtime.errors import CgilError

    learner = prompts_for(clip, True)
    state = learner.learned_state()
    state["generator.6.weight"] = torch.zeros(64, 32)  # the third block as an older layout would save it
    with pytest.raises(CgilError, match="context generator does not fit"):
        learner.load_learned_state(state, list(range(len(NAMES))), NAMES)


def test_keys_of_host_rows_equal_the_rows_of_all_keys(clip):
    learner = prompts_for(clip, True)
    rows = torch.tensor([3, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(learner.keys(rows), learner.keys()[rows], atol=1e-6, rtol=0)


def test_sampled_negatives_hold_the_batch_classes_and_distinct_others(clip):
    learner = Learner(clip, GeneratorConfig(kind="gauss"), AlignConfig(negatives=3))
    learner.add_classes(list(range(10)), [f"class {i}" for i in range(10)], seed=0)
    batch_cols = torch.tensor([7, 2, 7, 9, 2])
    rows, target = learner.sampled_classes(batch_cols, torch.Generator().manual_seed(0))
    assert torch.equal(rows[target], batch_cols)  # each sample's target row is its own class
    assert len(rows) == 3 + 3 and len(set(rows.tolist())) == 6  # present classes, then 3 distinct others
    assert not set(rows[3:].tolist()) & {2, 7, 9}


@pytest.mark.slow
def test_alignment_with_sampled_negatives_separates_many_classes(clip):
    """Sampled softmax (AlignConfig.negatives): each step sees its batch's classes and 2 others out of 12,
    yet the keys learned classify all 12 well-separated clusters."""
    g = torch.Generator().manual_seed(0)
    d, c = clip.identity.embed_dim, 12
    centers = 3 * torch.randn(c, d, generator=g)
    labels = torch.arange(c).repeat_interleave(16)
    feats = centers[labels] + 0.3 * torch.randn(len(labels), d, generator=g)
    learner = Learner(clip, GeneratorConfig(kind="gauss"), AlignConfig(epochs=8, lr=0.05, batch_size=4, negatives=2))
    learner.add_classes(list(range(c)), [f"class {i}" for i in range(c)], seed=0)
    learner.align(Learner.real_source(feats, labels), seed=0)
    pred = (torch.nn.functional.normalize(feats, dim=-1) @ learner.head().t()).argmax(1)
    assert (pred == labels).float().mean() > 0.9
