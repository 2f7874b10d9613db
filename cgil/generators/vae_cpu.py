"""The VAE's training step written out by hand for CPUs: forward, backward and Adam with no autograd.

Why: a digits task's VAE step is ~0.38 GFLOP over ~1M parameters at batch 64, so on one CPU core
it is bound by GEMMs and by passes over parameter-sized memory, not by arithmetic elsewhere. Autograd
adds a graph per step, temporaries per op and a gradient buffer per parameter; here one class's
parameters, gradients and Adam moments each live in one flat buffer, Adam is torch's fused kernel over
each layer's views as soon as the backward is done with that layer, and the forward keeps exactly what
the backward needs. Classes train one after another, each
from its own RNG streams.

Exact: every operation is the one autograd runs for the batched loop (`VAEGenerators.batch_loss`,
reference objective), on the same operands and in the same order, so a class ends bit for bit where
the batched autograd loop ends (`tests/test_vae_cpu.py`, one and two threads). That is why it is
the CPU default: it changes the cost, never the result. (An earlier version computed the same
gradients in another order, equal to ~5e-7; end to end it scored 1.1 points lower over 21 paired runs,
docs/reference-differences.md: on these features alignment amplifies rounding-level replay changes.)
The textbook objective runs the autograd loop.

Measured (`cgil bench update`, a digits task's fit on one core): its 17 GEMMs alone, in a step's order,
take ~5.1 of its ~8 ms per class step; Adam ~9% (torch.profiler). It costs what the autograd loop costs
within noise: the loop's overhead was never the bottleneck, the GEMMs' memory traffic is. bfloat16
GEMM operands (AMX) were tried and dropped: casting weights and gradients every step ate most of the
GEMM gain, for rounding the reference does not do.

Notation (one class, batch B): encoder a1 = x W1 + b1, y1 = BN(a1), h1 = lrelu(y1), a2 = h1 W2 + b2,
y2 = BN(a2), h2 = lrelu(y2), [mu | s] = h2 W3 + b3, z = mu + exp(s) eps; decoder d1 = z V1 + c1,
e1 = lrelu(d1), d2 = e1 V2 + c2, e2 = lrelu(d2), x_hat = e2 V3 + c3. Loss per sample:
0.5 |x_hat - x|^2 + 0.5 sum(exp(s) + mu^2 - 1 - s) (+ a constant).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .layers import BatchedBatchNorm

_BN_EPS = 1e-5
_SLOPE = 0.2
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class FlatVAE:
    """One class's VAE as flat float32 buffers: parameters, gradients, Adam moments (weights first)."""

    def __init__(self, dim: int, hidden: int, latent: int):
        self.dim, self.hidden, self.latent = dim, hidden, latent
        self.weight_shapes = [(dim, hidden), (hidden, hidden), (hidden, 2 * latent),  # W1 W2 W3
                              (latent, hidden), (hidden, hidden), (hidden, dim)]      # V1 V2 V3
        self.vector_sizes = [hidden, hidden, 2 * latent, hidden, hidden, dim,  # b1 b2 b3 c1 c2 c3
                             hidden, hidden, hidden, hidden]                    # BN gamma1 beta1 gamma2 beta2
        self.n_weights = sum(i * o for i, o in self.weight_shapes)
        total = self.n_weights + sum(self.vector_sizes)
        self.params, self.grads = torch.zeros(total), torch.zeros(total)
        self.m, self.v = torch.zeros(total), torch.zeros(total)
        self.step_count = torch.zeros(())  # the fused kernel reads the step from a tensor
        self._adam = None  # (lr, betas, eps) during a step
        self.w, self.vec = self._split(self.params)
        self.gw, self.gvec = self._split(self.grads)
        # Adam runs over per-tensor views: the fused kernel's vector body and scalar tail then fall on the
        # same elements as BatchedAdam's per-parameter calls (one flat call differs in the last bit when
        # a tensor's size is not a multiple of the vector width).
        self.adam_lists = [[*w, *v] for w, v in (self._split(t) for t in (self.params, self.grads, self.m, self.v))]
        self._adam_args: dict = {}  # (weights, vectors) of an `_update` call -> its argument lists

    def _split(self, flat: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights, vectors, off = [], [], 0
        for i, o in self.weight_shapes:
            weights.append(flat[off:off + i * o].view(i, o))
            off += i * o
        for n in self.vector_sizes:
            vectors.append(flat[off:off + n])
            off += n
        return weights, vectors

    def load(self, encoder: Sequence[torch.nn.Module], decoder: Sequence[torch.nn.Module]) -> None:
        """Copy K=1 batched modules (BatchedLinear / BatchedBatchNorm, initialised the usual way) in."""
        bns = [m for m in encoder if isinstance(m, BatchedBatchNorm)]
        linears = [m for m in encoder if not isinstance(m, BatchedBatchNorm)] + list(decoder)
        with torch.no_grad():
            for w, b, layer in zip(self.w, self.vec[:6], linears):
                w.copy_(layer.weight[0])
                b.copy_(layer.bias[0].reshape(-1))
            for j, bn in enumerate(bns):
                self.vec[6 + 2 * j].copy_(bn.weight[0].reshape(-1))
                self.vec[7 + 2 * j].copy_(bn.bias[0].reshape(-1))

    def decoder_state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.w[3 + j].clone(), self.vec[3 + j].clone()) for j in range(3)]

    # ------------------------------------------------------------------ one step

    def step(self, x: torch.Tensor, eps: torch.Tensor, lr: float, want_loss: bool = False,
             betas=(0.9, 0.999), adam_eps: float = 1e-8) -> Optional[torch.Tensor]:
        """Gradients of the mean loss on batch x (B, D) with latent noise eps (B, L) and one Adam step
        (BatchedAdam's fused kernel, over the same tensors). Returns the loss before the step when `want_loss`."""
        self.step_count.add_(1)
        self._adam = (lr, betas, adam_eps)
        try:
            return self.gradients(x, eps, want_loss, update=True)
        finally:
            self._adam = None

    def _update(self, weights: Sequence[int], vectors: Sequence[int]) -> None:
        """Adam on some layers' tensors (indices into w and vec), as soon as the backward is done with them:
        the weight the input gradient just read and the gradient just written are still in cache (~4% of
        the step). Elementwise, so the order of the layers changes nothing."""
        lr, (beta1, beta2), eps = self._adam
        key = (tuple(weights), tuple(vectors))
        lists = self._adam_args.get(key)
        if lists is None:  # six fixed layer groups per step: build their tensor lists once, not every step
            idx = [*weights, *[len(self.w) + j for j in vectors]]
            lists = self._adam_args[key] = [[t[i] for i in idx] for t in self.adam_lists] + [[self.step_count] * len(idx)]
        torch._fused_adam_(*lists[:4], [], lists[4], lr=lr, beta1=beta1, beta2=beta2,
                           weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)

    def gradients(self, x: torch.Tensor, eps: torch.Tensor, want_loss: bool = False,
                  update: bool = False) -> Optional[torch.Tensor]:
        """Fill the gradient buffer for batch x (B, D) and latent noise eps (B, L); the batch's mean loss
        (a float32 0-dim tensor, constant included, computed as the batched loop computes it) when `want_loss`.

        Every operation is the one autograd runs for `VAEGenerators.batch_loss`, on the same operands, in
        the same order (addmm is baddbmm's kernel, mm is bmm's; the loss's factors 1/B and 0.5 are applied
        as autograd's chain applies them; the three gradients reaching s are summed in autograd's order),
        so the gradients are bit for bit autograd's (`tests/test_vae_cpu.py`). `update` (from `step`): each
        layer's Adam update runs as soon as the backward has read its weights for the last time."""
        done = self._update if update else (lambda weights, vectors: None)
        W1, W2, W3, V1, V2, V3 = self.w
        gW1, gW2, gW3, gV1, gV2, gV3 = self.gw
        b1, b2, b3, c1, c2, c3, g1, be1, g2, be2 = self.vec
        gb1, gb2, gb3, gc1, gc2, gc3, gg1, gbe1, gg2, gbe2 = self.gvec
        bsz, lat = x.shape[0], self.latent
        bn = torch.ops.aten.native_batch_norm
        lrelu_back = torch.ops.aten.leaky_relu_backward

        # forward, keeping what the backward reads
        a1 = torch.addmm(b1, x, W1)
        y1, mean1, rstd1 = bn(a1, g1, be1, None, None, True, 0.0, _BN_EPS)
        h1 = F.leaky_relu(y1, _SLOPE)
        a2 = torch.addmm(b2, h1, W2)
        y2, mean2, rstd2 = bn(a2, g2, be2, None, None, True, 0.0, _BN_EPS)
        h2 = F.leaky_relu(y2, _SLOPE)
        a3 = torch.addmm(b3, h2, W3)
        mu, s = a3[:, :lat], a3[:, lat:]
        sigma = torch.exp(s)  # the reference's z = mu + exp(s) eps
        z = mu + sigma * eps
        d1 = torch.addmm(c1, z, V1)
        e1 = F.leaky_relu(d1, _SLOPE)
        d2 = torch.addmm(c2, e1, V2)
        e2 = F.leaky_relu(d2, _SLOPE)
        x_hat = torch.addmm(c3, e2, V3)

        loss = None
        if want_loss:  # batch_loss's expressions on (1, B, .) views: its reductions, its rounding
            kl = 0.5 * (sigma + mu.pow(2) - 1 - s)[None].sum(dim=(1, 2))
            nll = 0.5 * (x_hat - x)[None].pow(2).sum(dim=(1, 2)) + _HALF_LOG_2PI * bsz * x.shape[1]
            loss = ((nll + kl) / bsz)[0]

        # backward of sum over the batch of (0.5 |x_hat - x|^2 + KL) / B: both terms get (1 / B) * 0.5
        half = torch.ones(()).div_(bsz).mul_(0.5)
        g = (x_hat - x).mul_(2.0).mul_(half)  # pow(2)'s backward: (2 (x_hat - x)) * grad
        _linear_back(e2, g, gV3, gc3)
        g = lrelu_back(torch.mm(g, V3.t()), d2, _SLOPE, False)
        done([5], [5])
        _linear_back(e1, g, gV2, gc2)
        g = lrelu_back(torch.mm(g, V2.t()), d1, _SLOPE, False)
        done([4], [4])
        _linear_back(z, g, gV1, gc1)
        g_z = torch.mm(g, V1.t())
        done([3], [3])
        g_a3 = torch.empty(bsz, 2 * lat)
        torch.add(mu.mul(2.0).mul_(half), g_z, out=g_a3[:, :lat])  # KL's mu.pow(2), then the decoder path
        # s: KL's "- s" (-grad), then KL's exp(s) (grad * exp(s)), then the sample's exp(s) ((g_z eps) exp(s))
        torch.add(torch.neg(half).expand_as(s) + sigma.mul(half), (g_z * eps).mul_(sigma), out=g_a3[:, lat:])
        _linear_back(h2, g_a3, gW3, gb3)
        g = lrelu_back(torch.mm(g_a3, W3.t()), y2, _SLOPE, False)
        done([2], [2])
        g = _norm_back(g, a2, g2, mean2, rstd2, gg2, gbe2)
        _linear_back(h1, g, gW2, gb2)
        g = lrelu_back(torch.mm(g, W2.t()), y1, _SLOPE, False)
        done([1], [1, 8, 9])  # BatchNorm 2's gamma and beta too: its backward has run
        g = _norm_back(g, a1, g1, mean1, rstd1, gg1, gbe1)
        _linear_back(x, g, gW1, gb1)
        done([0], [0, 6, 7])
        return loss


def _linear_back(inputs: torch.Tensor, grad_out: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor) -> None:
    """Weight and bias gradients of y = inputs @ W + b, written into the flat gradient buffer."""
    torch.mm(inputs.t(), grad_out, out=grad_w)
    torch.sum(grad_out, 0, out=grad_b)


def _norm_back(grad_out, inputs, gamma, mean, rstd, grad_gamma, grad_beta) -> torch.Tensor:
    """Training-mode BatchNorm backward: the input gradient; gamma's and beta's go to the flat buffer."""
    grad_in, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
        grad_out, inputs, gamma, None, None, mean, rstd, True, _BN_EPS, [True, True, True])
    grad_gamma.copy_(g_gamma)
    grad_beta.copy_(g_beta)
    return grad_in
