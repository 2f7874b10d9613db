"""The hand-written CPU step of the VAE (cgil/generators/vae_cpu.py) against autograd on the same model."""
import dataclasses

import pytest
import torch

from cgil.generators import GeneratorConfig, make_generators
from cgil.generators.layers import BatchedBatchNorm, class_generators
from cgil.generators.vae_cpu import FlatVAE

D, H, L = 24, 48, 12


@pytest.mark.parametrize("objective", ["reference", "textbook"])
def test_hand_written_gradients_equal_autograd(objective):
    cfg = GeneratorConfig(kind="vae", hidden_dim=H, latent_dim=L, vae_objective=objective)
    gen = make_generators(cfg, [3], D)
    nets = gen.build_networks(class_generators(0, [3]))
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(16, D, generator=g) * 2 + 1, torch.randn(16, L, generator=g)
    flat = FlatVAE(D, H, L)
    flat.load(nets["encoder"], nets["decoder"].layers)
    loss = gen.batch_loss(nets, x[None], (eps[None],))
    loss.sum().backward()
    value = flat.gradients(x, eps, textbook=objective == "textbook", want_loss=True)
    assert value == pytest.approx(float(loss.detach()), rel=1e-6)

    linears = [m for m in nets["encoder"] if not isinstance(m, BatchedBatchNorm)] + list(nets["decoder"].layers)
    norms = [m for m in nets["encoder"] if isinstance(m, BatchedBatchNorm)]
    scale = max(float(m.weight.grad.abs().max()) for m in linears)
    for j, layer in enumerate(linears):
        torch.testing.assert_close(flat.gw[j], layer.weight.grad[0], atol=1e-5 * scale, rtol=1e-4)
        bias_grad = layer.bias.grad[0].reshape(-1)
        if j < 2:  # a bias right before BatchNorm cancels: its true gradient is 0, both sides hold rounding
            assert flat.gvec[j].abs().max() < 1e-5 * scale and bias_grad.abs().max() < 1e-5 * scale
        else:
            torch.testing.assert_close(flat.gvec[j], bias_grad, atol=1e-5 * scale, rtol=1e-4)
    for j, bn in enumerate(norms):
        torch.testing.assert_close(flat.gvec[6 + 2 * j], bn.weight.grad[0].reshape(-1), atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(flat.gvec[7 + 2 * j], bn.bias.grad[0].reshape(-1), atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("objective", ["reference", "textbook"])
def test_cpu_fit_equals_the_batched_autograd_fit(objective):
    """Same init, data order, noise, learning rates and Adam: the two paths differ only by float rounding,
    with classes of unequal sizes (so unequal iteration counts) fitted together."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(150, D, generator=g) + 2, torch.randn(40, D, generator=g) * 0.5]
    cfg = GeneratorConfig(kind="vae", passes=6, hidden_dim=H, latent_dim=L, vae_objective=objective)
    by_hand = make_generators(dataclasses.replace(cfg, vae_cpu_step=True), [5, 9], D)
    by_autograd = make_generators(cfg, [5, 9], D)  # the default
    stats = by_hand.fit(feats, seed=3)
    reference = by_autograd.fit(feats, seed=3)
    assert stats["iterations"] == reference["iterations"] == [18, 6]
    assert stats["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-4)
    a = by_hand.sample(300, torch.Generator().manual_seed(4))
    b = by_autograd.sample(300, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(a, b)  # two computations (their rounding differs): the flag switched the path
    seen = []
    by_hand = make_generators(dataclasses.replace(cfg, vae_cpu_step=True), [5, 9], D)
    by_hand.fit(feats, seed=3, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (24, 24) and len(seen) == 24
