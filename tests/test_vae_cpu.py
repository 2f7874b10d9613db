"""The hand-written CPU step of the VAE (cgil/generators/vae_cpu.py) against autograd on the same model:
equal bit for bit, which is what lets it be the CPU default without changing any result."""
import dataclasses

import pytest
import torch

from cgil.generators import GeneratorConfig, make_generators
from cgil.generators.layers import BatchedBatchNorm, class_generators
from cgil.generators.vae_cpu import FlatVAE

D, H, L = 24, 48, 12


@pytest.mark.parametrize("batch", [16, 12])  # 12: 1/B is not a power of two, so the loss factors round
def test_hand_written_gradients_equal_autograd_bit_for_bit(batch):
    cfg = GeneratorConfig(kind="vae", hidden_dim=H, latent_dim=L)
    gen = make_generators(cfg, [3], D)
    nets = gen.build_networks(class_generators(0, [3]))
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(batch, D, generator=g) * 2 + 1, torch.randn(batch, L, generator=g)
    flat = FlatVAE(D, H, L)
    flat.load(nets["encoder"], nets["decoder"].layers)
    loss = gen.batch_loss(nets, x[None], (eps[None],))
    loss.sum().backward()
    value = flat.gradients(x, eps, want_loss=True)
    assert torch.equal(value, loss.detach()[0])

    linears = [m for m in nets["encoder"] if not isinstance(m, BatchedBatchNorm)] + list(nets["decoder"].layers)
    norms = [m for m in nets["encoder"] if isinstance(m, BatchedBatchNorm)]
    for j, layer in enumerate(linears):
        assert torch.equal(flat.gw[j], layer.weight.grad[0]), f"weight {j}"
        assert torch.equal(flat.gvec[j], layer.bias.grad[0].reshape(-1)), f"bias {j}"
    for j, bn in enumerate(norms):
        assert torch.equal(flat.gvec[6 + 2 * j], bn.weight.grad[0].reshape(-1))
        assert torch.equal(flat.gvec[7 + 2 * j], bn.bias.grad[0].reshape(-1))


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_fit_equals_the_batched_autograd_fit_bit_for_bit(threads):
    """Same init, data order, noise, learning rates and Adam, and the same operations: the default CPU fit
    (hand-written) and the batched autograd loop (vae_cpu_step=False, what GPUs run) give identical
    generators and losses, with classes of unequal sizes (so unequal iteration counts) fitted together."""
    g = torch.Generator().manual_seed(0)
    d = 64  # the real widths (digits' D, 512, 256): at toy widths bmm over 2 classes rounds unlike mm
    feats = [torch.randn(150, d, generator=g) + 2, torch.randn(40, d, generator=g) * 0.5]
    cfg = GeneratorConfig(kind="vae", passes=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        by_hand = make_generators(cfg, [5, 9], d)  # the default
        by_autograd = make_generators(dataclasses.replace(cfg, vae_cpu_step=False), [5, 9], d)
        stats = by_hand.fit(feats, seed=3)
        reference = by_autograd.fit(feats, seed=3)
    finally:
        torch.set_num_threads(before)
    assert stats == reference and stats["iterations"] == [6, 2]
    for name, tensor in by_autograd.state_dict().items():
        assert torch.equal(by_hand.state_dict()[name], tensor), name
    seen = []
    make_generators(cfg, [5, 9], d).fit(feats, seed=3, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (8, 8) and len(seen) == 8  # the hand-written path ran (it counts per class step)


def test_textbook_objective_runs_the_autograd_loop():
    """The hand-written step is the reference objective's; the textbook one keeps autograd (equal either way)."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(40, D, generator=g), torch.randn(30, D, generator=g)]
    cfg = GeneratorConfig(kind="vae", passes=2, hidden_dim=H, latent_dim=L, vae_objective="textbook")
    seen = []
    a = make_generators(cfg, [1, 2], D)
    a.fit(feats, seed=0, progress=lambda done, total: seen.append(total))
    assert seen[-1] == 2  # the batched loop counts steps of the whole batch (max iterations), not class steps
    b = make_generators(dataclasses.replace(cfg, vae_cpu_step=False), [1, 2], D)
    b.fit(feats, seed=0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
