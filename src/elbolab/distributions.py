"""Log-densities written once, on stable parameterizations.

Shapes follow the sample-first convention: a batch of values is ``[..., B, D]`` and
log-densities are summed over the last (event) axis, giving ``[..., B]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)

#: draws standard normals of a shape for reparameterized samples; set by :func:`noise_source`
NoiseSource = Callable[[tuple[int, ...], torch.dtype, torch.device], Tensor]
_NOISE: contextvars.ContextVar[NoiseSource | None] = contextvars.ContextVar("elbolab_noise", default=None)


def standard_normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise of ``shape`` in ``like``'s dtype and device: the one place a training step draws.

    ``torch.randn`` from ``generator`` (else torch's global stream), unless a caller without a
    generator runs inside :func:`noise_source`: a stacked run draws each run's share from that
    run's own stream there (elbolab.training).
    """
    source = _NOISE.get() if generator is None else None
    if source is not None:
        return source(tuple(shape), like.dtype, like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


@contextlib.contextmanager
def noise_source(source: NoiseSource) -> Iterator[None]:
    """Route :func:`standard_normal` calls without a generator to ``source`` inside the block."""
    token = _NOISE.set(source)
    try:
        yield
    finally:
        _NOISE.reset(token)


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
    binary (grey levels give the usual cross-entropy). Without gradients,
    :func:`elbolab.fastpaths.bernoulli_log_prob` computes it faster through the last layer.
    """
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


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
        eps = standard_normal((k, *self.mean.shape), self.mean, generator)
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
