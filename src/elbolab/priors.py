"""Priors p(z): each has ``log_prob(z [..., D]) -> [...]`` and ``sample(n) -> [n, D]``.

Priors are modules so that learnable ones (mixtures, VampPrior) train with the model.
Priors that depend on the model's own encoder (VampPrior) receive it through
:meth:`Prior.attach`, called once when the model is built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from .distributions import log_standard_normal


class Prior(nn.Module, ABC):
    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    @abstractmethod
    def log_prob(self, z: Tensor) -> Tensor: ...

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def attach(self, model: nn.Module) -> None:
        """Hook for priors that use the model (e.g. its encoder); default: nothing."""

    @property
    def has_analytic_kl(self) -> bool:
        """True when KL(N(m, s) || p) has a closed form used by diagnostics."""
        return False


class StandardNormal(Prior):
    """p(z) = N(0, I)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        a = self._anchor
        return torch.randn(n, self.latent_dim, generator=generator, dtype=a.dtype, device=a.device)

    @property
    def has_analytic_kl(self) -> bool:
        return True


PRIORS: dict[str, type[Prior]] = {"standard": StandardNormal}


def make_prior(cfg, latent_dim: int, data_dim: int, train_data: Tensor | None = None) -> Prior:
    """Build the prior a :class:`~elbolab.config.PriorConfig` names."""
    if cfg.name not in PRIORS:
        raise ValueError(f"unknown prior {cfg.name!r}; choose one of {sorted(PRIORS)}")
    return PRIORS[cfg.name](latent_dim)
