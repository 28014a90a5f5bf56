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
