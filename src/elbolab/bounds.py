"""Bounds on log p(x) from one tensor of log importance weights.

Every function takes ``log_w`` of shape ``[K, B]`` (sample axis first):
``log_w[k, b] = log p(x_b, z_kb) - log q(z_kb | x_b)`` for ``z_kb ~ q(z | x_b)``.
They are pure functions of that tensor, so they never need to know which model,
prior or likelihood produced it, and they are differentiable: autograd through
:func:`iwae` gives exactly the IWAE gradient (normalized weights times the gradient
of each log weight).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "check_log_weights",
    "effective_sample_size",
    "elbo",
    "iwae",
    "log_mean_exp",
    "normalized_weights",
]


def check_log_weights(log_w: Tensor) -> Tensor:
    """Reject what would otherwise fail deep inside torch or silently broadcast."""
    if not isinstance(log_w, Tensor):
        raise TypeError(f"log weights must be a torch.Tensor of shape [K, B], got {type(log_w).__name__}")
    if log_w.dim() != 2:
        raise ValueError(f"log weights must have shape [K, B] (samples first), got shape {tuple(log_w.shape)}")
    if log_w.shape[0] < 1 or log_w.shape[1] < 1:
        raise ValueError(f"log weights must have K >= 1 and B >= 1, got shape {tuple(log_w.shape)}")
    if not log_w.is_floating_point():
        raise TypeError(f"log weights must be floating point, got {log_w.dtype}")
    return log_w


def log_mean_exp(x: Tensor, dim: int = 0) -> Tensor:
    """log(mean(exp(x))) along ``dim`` without overflow: logsumexp minus log n."""
    if x.shape[dim] == 0:
        raise ValueError(f"log_mean_exp: nothing to average along dim {dim} (shape {tuple(x.shape)} is empty)")
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def elbo(log_w: Tensor) -> Tensor:
    """[K, B] -> [B]: the mean of K single-sample ELBOs (the IWAE paper's "VAE, k" bound).

    With K = 1 this is the ELBO; with K > 1 it is the same bound, estimated with
    lower variance, and it does not tighten as K grows.
    """
    return check_log_weights(log_w).mean(dim=0)


def iwae(log_w: Tensor) -> Tensor:
    """[K, B] -> [B]: L_K = log (1/K) sum_k w_k, the importance-weighted bound.

    E[L_K] is non-decreasing in K, equals the ELBO at K = 1 and tends to log p(x).
    """
    return log_mean_exp(check_log_weights(log_w), dim=0)


def normalized_weights(log_w: Tensor) -> Tensor:
    """[K, B] -> [K, B]: w_k / sum_j w_j; each column sums to one.

    These are the IWAE gradient's weights and the resampling probabilities of q_EW.
    """
    return torch.softmax(check_log_weights(log_w), dim=0)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """[K, B] -> [B]: (sum w)^2 / sum w^2, in [1, K]; K means all weights are equal.

    Computed in log space after shifting each column by its largest log weight, so the
    two log-sums are O(log K) and no precision is lost at any magnitude of log w.
    """
    check_log_weights(log_w)
    shifted = log_w - log_w.max(dim=0, keepdim=True).values
    return torch.exp(2.0 * torch.logsumexp(shifted, dim=0) - torch.logsumexp(2.0 * shifted, dim=0))
