"""Log-densities written once, on stable parameterizations.

Shapes follow the sample-first convention: a batch of values is ``[..., B, D]`` and
log-densities are summed over the last (event) axis, giving ``[..., B]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def log_normal_diag(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, diag(exp(log_var))), summed over the last axis."""
    return -0.5 * (LOG_2PI + log_var + (x - mean).pow(2) * torch.exp(-log_var)).sum(-1)


def log_standard_normal(x: Tensor) -> Tensor:
    """log N(x; 0, I), summed over the last axis."""
    return -0.5 * (LOG_2PI + x.pow(2)).sum(-1)


def log_bernoulli_logits(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) = x * logits - softplus(logits), summed over the last axis.

    Exact for any logit magnitude (no sigmoid followed by a log). ``x`` may be
    ``[B, D]`` while ``logits`` is ``[K, B, D]``; it broadcasts. ``x`` need not be
    binary (grey levels give the usual "continuous Bernoulli-free" cross-entropy).
    Training takes this form through autograd: a fused version (one sigmoid shared with
    the backward) measured no faster at two threads (docs/bench.md).
    """
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


def log_bernoulli_linear_(x: Tensor, features: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`log_bernoulli_logits` at ``logits = features @ weight.T + bias``, without gradients.

    ``x`` [B, D], ``features`` [..., B, H], ``weight`` [D, H]: ``[..., B]``. For the
    importance-sampled log-likelihood, where the general form's two ``[K, B, D]``
    temporaries (``x * logits`` and the softplus) cost more in fresh memory pages than
    their arithmetic. Here ``sum_d x_d logits_d = features . (x @ weight) + x . bias``
    is an ``[..., B, H]`` product (H = 200 against D = 784 pixels for MNIST) and the
    softplus sum overwrites the logits it owns (:func:`sum_softplus_`): together 1.4x
    faster log weights for the 784-200-200-50 model (docs/bench.md), equal to the
    general form's up to float32 rounding. Refuses inputs that need a gradient.
    """
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        raise ValueError("log_bernoulli_linear_ has no gradient; use log_bernoulli_logits on F.linear(...)")
    logits = F.linear(features, weight, bias)
    x_dot_logits = (features * (x @ weight)).sum(-1)
    if bias is not None:
        x_dot_logits = x_dot_logits + x @ bias
    return x_dot_logits - sum_softplus_(logits)


#: halvings in :func:`sum_softplus_`: each slot then holds a product of at most 2^5 = 32
#: factors in [1/2, 1], so at least 2^-32, far from float32's smallest normal (2^-126)
_HALVINGS = 5


def sum_softplus_(logits: Tensor) -> Tensor:
    """``softplus(logits).sum(-1)``, overwriting ``logits``: 1.5x faster than an in-place
    softplus and sum (6.4 -> 4.3 ms for 5,000 x 784 logits on one core).

    ``softplus(l) = relu(l) - log sigmoid(|l|)``, and ``sigmoid(|l|)`` lies in [1/2, 1],
    so the logs of 784 factors can be taken as the log of a few products of 32 (made by
    halving the last axis in place): one sigmoid pass and a few multiplies replace
    ``log1p(exp(l))`` on every pixel (both transcendental, and torch's CPU ``log1p`` is
    slow). Each factor is rounded once and each product picks up at most 32 roundings.
    ``sum relu(l) = (sum l + sum |l|) / 2`` is rounded at the size of ``sum |l|`` rather
    than of the softplus sum: for a trained-looking decoder, log p(x, z) lands about one
    float32 ulp from float64 on average, three times torch's own path (a float64 sum or
    a relu temporary would cost the speed back; tests/test_fast_elementwise.py).
    """
    total = logits.sum(-1)
    logits.abs_()
    relu = (total + logits.sum(-1)) * 0.5
    return relu - _log_prod_(torch.sigmoid(logits, out=logits))


def _log_prod_(p: Tensor) -> Tensor:
    """``log(p).sum(-1)`` for p in [1/2, 1] as the log of products of 32, made in place."""
    n = p.shape[-1]
    for _ in range(_HALVINGS):
        h = n // 2
        if h == 0:
            break
        p[..., :h].mul_(p[..., h : 2 * h])
        if n % 2:  # the odd factor out moves next to the products and rides along
            p[..., h].copy_(p[..., 2 * h])
        n = h + n % 2
    return p[..., :n].log().sum(-1)


def kl_normal_standard(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, diag exp(log_var)) || N(0, I)) in closed form, summed over the last axis."""
    return 0.5 * (mean.pow(2) + torch.exp(log_var) - 1.0 - log_var).sum(-1)


@dataclass
class DiagonalGaussian:
    """A diagonal Gaussian over the last axis, parameterized by mean and log-variance.

    ``mean`` and ``log_var`` are ``[B, D]`` (or any leading shape).
    """

    mean: Tensor
    log_var: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.log_var)

    def rsample(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """k reparameterized draws, ``[k, *mean.shape]``."""
        shape = (k, *self.mean.shape)
        eps = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device, generator=generator)
        return self.mean + self.std * eps

    def log_prob(self, z: Tensor) -> Tensor:
        return log_normal_diag(z, self.mean, self.log_var)

    def detach(self) -> DiagonalGaussian:
        """The same density with its parameters cut from the graph (for STL / DReG)."""
        return DiagonalGaussian(self.mean.detach(), self.log_var.detach())

    def kl_standard(self) -> Tensor:
        return kl_normal_standard(self.mean, self.log_var)


def log_normal_diag_mixture(
    z: Tensor, means: Tensor, log_vars: Tensor, log_mix: Tensor, max_elements: int = 1 << 24
) -> Tensor:
    """log sum_c pi_c N(z; m_c, diag exp(lv_c)) for z ``[..., D]`` against C components ``[C, D]``.

    ``log_mix`` ``[C]`` holds log pi_c (log-softmax'd, or -log C for uniform weights).
    Each component's quadratic form is expanded as
    ``sum_d z_d^2 / v_cd - 2 z_d m_cd / v_cd + m_cd^2 / v_cd``, so the whole
    ``[N, C]`` table is two GEMMs instead of an ``[N, C, D]`` broadcast. The expansion
    cancels badly in float32 when variances are small (errors ~ eps * |z|^2 / v), so it
    runs in float64 and returns ``z.dtype``; rows are processed in chunks of at most
    ``max_elements`` table entries to bound memory. z and the means are first centred on
    the means' average (the density is translation invariant), which keeps the expansion
    accurate to ~1e-10 nats for latents within ~100 component widths of the mixture.
    """
    out_dtype = z.dtype
    lead = z.shape[:-1]
    centre = means.double().mean(0)
    zf = z.reshape(-1, z.shape[-1]).double() - centre
    means = means.double() - centre
    prec = torch.exp(-log_vars.double())  # [C, D]
    mp = means * prec  # [C, D]
    # per-component constant: log pi_c - 0.5 (D log 2 pi + sum lv_c + sum m_c^2 / v_c)
    const = log_mix.double() - 0.5 * (means.shape[-1] * LOG_2PI + log_vars.double().sum(-1) + (means * mp).sum(-1))
    rows = max(1, min(zf.shape[0], max_elements // max(1, means.shape[0])))
    if torch.is_grad_enabled() and (zf.requires_grad or prec.requires_grad or mp.requires_grad):
        outs = []  # a prior in training: autograd needs each chunk's own tensors
        for start in range(0, zf.shape[0], rows):
            zc = zf[start : start + rows]
            outs.append(torch.logsumexp(-0.5 * (zc * zc) @ prec.T + zc @ mp.T + const, dim=-1))
        return torch.cat(outs).reshape(lead).to(out_dtype)
    out = zf.new_empty(zf.shape[0])
    # one [rows, C] buffer for every chunk, the log-sum-exp done in it: no table-sized
    # temporaries, so no page faults and nothing for the allocator to fragment
    buf = zf.new_empty(rows, means.shape[0])
    for start in range(0, zf.shape[0], rows):
        zc = zf[start : start + rows]
        quad = buf[: zc.shape[0]]
        torch.mm(zc * zc, prec.T, out=quad)
        quad.mul_(-0.5).addmm_(zc, mp.T).add_(const)  # [n, C]
        top = quad.amax(dim=-1, keepdim=True)
        out[start : start + zc.shape[0]] = quad.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
    return out.reshape(lead).to(out_dtype)


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small and large d (Maechler 2012)."""
    ln2 = math.log(2.0)
    # each branch sees only inputs where it is accurate, so neither leaks inf/NaN gradients
    small = torch.log(-torch.expm1(-d.clamp(max=ln2)))
    large = torch.log1p(-torch.exp(-d.clamp(min=ln2)))
    return torch.where(d < ln2, small, large)


def log_discretized_logistic(x: Tensor, loc: Tensor, log_scale: Tensor, levels: int = 256) -> Tensor:
    """log P(x) for ``levels`` grey levels under a logistic(loc, scale) discretized into bins.

    Convention: x in [0, 1] is level ``i = round(x * (levels - 1))``; bin i is
    ``[(i - 1/2) / (levels - 1), (i + 1/2) / (levels - 1)]`` with the first bin extended
    to -inf and the last to +inf, so the probabilities of all levels sum to one.
    The mass of an interior bin [a, b] is computed as
    ``log sigmoid(b') + log sigmoid(-a') + log(1 - exp(-(b' - a')))`` with
    a' = (a - loc) / s, b' = (b - loc) / s: no subtraction of nearly equal CDFs, exact
    in the tails. Summed over the last axis; x ``[B, D]`` broadcasts against ``[..., B, D]``.
    """
    step = 1.0 / (levels - 1)
    level = torch.round(x / step)
    inv_s = torch.exp(-log_scale)
    # edges as (i +- 1/2) * step: bin i's upper edge is bitwise bin i+1's lower edge, and
    # the width term uses the computed b' - a', so the bin masses telescope to one
    upper = ((level + 0.5) * step - loc) * inv_s  # b'
    lower = ((level - 0.5) * step - loc) * inv_s  # a'
    log_cdf_upper = F.logsigmoid(upper)
    log_sf_lower = F.logsigmoid(-lower)
    interior = log_cdf_upper + log_sf_lower + _log1mexp(upper - lower)
    first = level <= 0
    last = level >= levels - 1
    log_p = torch.where(first, log_cdf_upper, torch.where(last, log_sf_lower, interior))
    return log_p.sum(-1)
