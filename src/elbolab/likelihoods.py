"""Observation models p(x | z): turn decoder outputs into log-densities and images.

A decoder emits ``params_per_pixel * D`` numbers per image; the likelihood says how
to read them. Registered by name so a config line picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from .distributions import log_bernoulli_logits


class Likelihood(nn.Module, ABC):
    """Base class: ``log_prob(x [B, D], params [..., B, P*D]) -> [..., B]``."""

    params_per_pixel: int = 1
    #: whether the data must be binary ({0, 1}) for this likelihood to be a density
    binary: bool = False

    @abstractmethod
    def log_prob(self, x: Tensor, params: Tensor) -> Tensor: ...

    @abstractmethod
    def mean(self, params: Tensor) -> Tensor:
        """Expected image in [0, 1] (for reconstructions and sample grids)."""

    def init_output_bias(self, bias: Tensor, pixel_mean: Tensor) -> None:
        """Start the decoder at the data's average image, as the IWAE paper does."""


class BernoulliLikelihood(Likelihood):
    """Bernoulli on logits: exact for any logit, never log(sigmoid)."""

    params_per_pixel = 1
    binary = True

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return log_bernoulli_logits(x, params)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def init_output_bias(self, bias: Tensor, pixel_mean: Tensor) -> None:
        p = pixel_mean.clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            bias.copy_(torch.log(p) - torch.log1p(-p))


LIKELIHOODS: dict[str, type[Likelihood]] = {"bernoulli": BernoulliLikelihood}


def make_likelihood(name: str) -> Likelihood:
    try:
        return LIKELIHOODS[name]()
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}") from None


