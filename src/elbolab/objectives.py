"""Training objectives: a bound to maximize, returned with the loss whose gradient we follow.

An objective never returns "a loss" in place of a bound: :class:`ObjectiveResult`
carries the bound itself (per data point, for logging) and, separately, the scalar
loss to minimize. Objectives are registered by the name a config uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from . import bounds
from .config import ObjectiveConfig
from .models.base import LatentVariableModel, LogWeightTerms


@dataclass
class ObjectiveResult:
    #: scalar to minimize: minus the batch mean of the (possibly KL-tempered) bound
    loss: Tensor
    #: [B] the bound being optimized at KL weight 1, detached: the number to report
    bound: Tensor
    #: [K, B] detached log weights at KL weight 1
    log_w: Tensor
    #: the terms behind the log weights (for fault reports)
    terms: LogWeightTerms


def _result(train_bound: Tensor, report: Callable[[Tensor], Tensor], terms: LogWeightTerms) -> ObjectiveResult:
    log_w = terms.log_weights().detach()
    return ObjectiveResult(loss=-train_bound.mean(), bound=report(log_w), log_w=log_w, terms=terms)


def vae_objective(model: LatentVariableModel, x: Tensor, k: int, kl_weight: float = 1.0) -> ObjectiveResult:
    """Mean of k single-sample ELBOs (the IWAE paper's "VAE" rows). With kl_weight < 1
    the KL term is scaled down (warm-up); the reported bound is always the true ELBO."""
    terms = model.log_weight_terms(x, k)
    return _result(bounds.elbo(terms.log_weights(kl_weight)), bounds.elbo, terms)


def iwae_objective(model: LatentVariableModel, x: Tensor, k: int, kl_weight: float = 1.0) -> ObjectiveResult:
    """L_k. Autograd through logsumexp yields the IWAE gradient sum_k w~_k grad log w_k.

    Warm-up for IWAE tempers each log weight, log p(x|z) + beta (log p(z) - log q(z|x)),
    before the log-mean-exp: at beta = 1 it is L_k, and at beta < 1 the resampling
    weights lean on the likelihood, just as the warmed-up ELBO does.
    """
    terms = model.log_weight_terms(x, k)
    return _result(bounds.iwae(terms.log_weights(kl_weight)), bounds.iwae, terms)


#: an objective as the trainer calls it: (model, x, kl_weight) -> ObjectiveResult
Objective = Callable[[LatentVariableModel, Tensor, float], ObjectiveResult]

#: name -> objective(model, x, k, kl_weight)
OBJECTIVES: dict[str, Callable[..., ObjectiveResult]] = {"vae": vae_objective, "iwae": iwae_objective}


def make_objective(cfg: ObjectiveConfig) -> Objective:
    """Bind an objective config (name, k, ...) into the callable the trainer steps with."""
    try:
        fn = OBJECTIVES[cfg.name]
    except KeyError:
        raise ValueError(f"unknown objective {cfg.name!r}; choose one of {sorted(OBJECTIVES)}") from None

    def objective(model: LatentVariableModel, x: Tensor, kl_weight: float = 1.0) -> ObjectiveResult:
        return fn(model, x, cfg.k, kl_weight=kl_weight)

    return objective
