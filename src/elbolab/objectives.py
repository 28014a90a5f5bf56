"""Training objectives: a bound to maximize, returned with the loss whose gradient we follow.

An objective never returns "a loss" in place of a bound: :class:`ObjectiveResult`
carries the bound itself (per data point, for logging) and, separately, the scalar
loss to minimize. Objectives are registered by the name a config uses.

Every objective here is a weighted sum of *grouped* importance-weighted bounds over one
set of draws: the n draws per data point are cut into groups of g and the bound is the
mean over groups of log-mean-exp within a group (g = 1: the ELBO; one group: L_n; m
groups of k: MIWAE). A :class:`BoundPlan` says which such sum the decoder follows, which
the encoder follows and which is reported.

The gradient estimator only changes the encoder's gradient (the value of every bound is
the same number whichever estimator is chosen; Pyro's pattern: the loss is
``value + (surrogate - surrogate.detach())``):

- ``standard``: autograd through the bound, sum_k w~_k d log w_k (IWAE paper);
- ``stl``: the same with log q evaluated at detached variational parameters, which drops
  the score term (Roeder et al. 2017); unbiased for the ELBO, biased for L_k at k > 1;
- ``dreg``: encoder gradient sum_k w~_k^2 (d log w_k / dz_k)(dz_k / dphi), unbiased
  (Tucker et al. 2018); the decoder gradient is the standard one.

How DReG is computed: with one stochastic layer (``terms.z`` holds one sample tensor),
the STL surrogate is used and a hook rescales the gradient reaching each sample z_k by
w~_k, turning w~_k into w~_k^2 on the path through z only (a prior that reuses encoder
parameters, like the VampPrior, keeps its correct w~_k weight). With several layers, a
later sample depends on an earlier one and a per-sample hook would rescale that path
twice, so the encoder follows sum_k w~_k^2 log w_k instead (exact unless the prior reuses
encoder parameters, whose direct gradient then also gets w~_k^2).

When encoder and decoder follow different surrogates (PIWAE, multi-layer DReG) they are
routed by :meth:`LatentVariableModel.encoder_parameters`: each side's gradient is
computed with ``torch.autograd.grad`` and folded into the loss as ``sum(p * grad)``, so
the trainer's single ``loss.backward()`` still delivers them (one extra backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import bounds
from .config import ObjectiveConfig
from .models.base import LatentVariableModel, LogWeightTerms
from .registry import Registry

#: ``objective.estimator`` -> what it does to the encoder's gradient
ESTIMATORS: Registry[str] = Registry("gradient estimator", {
    "standard": "autograd through the bound: sum_k w~_k d log w_k (the IWAE paper's)",
    "stl": "sticking the landing: the score term dropped (Roeder et al. 2017)",
    "dreg": "doubly reparameterized: w~_k^2 on the path through the samples (Tucker et al. 2018)",
})


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


# --- grouped bounds ---------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """``weight`` times the mean over groups of ``group`` draws of L_group."""

    weight: float
    group: int


@dataclass(frozen=True)
class BoundPlan:
    #: draws per data point (a multiple of every part's group size)
    n_samples: int
    #: the bound whose gradient the decoder (generative model) follows
    decoder: tuple[Part, ...]
    #: the bound whose gradient the encoder follows
    encoder: tuple[Part, ...]
    #: the bound reported as ``ObjectiveResult.bound``
    report: tuple[Part, ...]


def _groups(log_w: Tensor, group: int) -> Tensor:
    """[n, B] -> [n / group, group, B]: consecutive draws form a group."""
    n, b = bounds.check_log_weights(log_w).shape
    if n % group:
        raise ValueError(f"{n} draws cannot be cut into groups of {group}")
    return log_w.reshape(n // group, group, b)


def grouped_iwae(log_w: Tensor, group: int) -> Tensor:
    """[n, B] -> [B]: mean over the n / group groups of L_group (MIWAE; g = 1: ELBO; g = n: L_n)."""
    return bounds.log_mean_exp(_groups(log_w, group), dim=1).mean(dim=0)


def combined_bound(log_w: Tensor, parts: Sequence[Part]) -> Tensor:
    """[n, B] -> [B]: sum of ``weight * grouped_iwae(log_w, group)`` over the parts."""
    return sum(p.weight * grouped_iwae(log_w, p.group) for p in parts)


def _dreg_surrogate(log_w: Tensor, parts: Sequence[Part]) -> Tensor:
    """[n, B] -> [B] whose gradient through z is DReG's sum_k w~_k^2 d log w_k, per group.

    ``log_w`` must come from ``stop_posterior_grad`` terms (no score path). Its value is
    not a bound; only its gradient is used.
    """
    out = 0.0
    for p in parts:
        g = _groups(log_w, p.group)
        w = torch.softmax(g.detach(), dim=1)
        out = out + p.weight * (w.pow(2) * g).sum(dim=1).mean(dim=0)
    return out


def _dreg_sample_scale(log_w: Tensor, parts: Sequence[Part]) -> Tensor:
    """[n, B]: the factor that turns the bound's weight on each draw into DReG's.

    The gradient a bound sends into draw k is c_k d log w_k with c_k = sum over parts of
    weight * w~_k / groups; DReG wants sum of weight * w~_k^2 / groups. Their ratio,
    applied to the gradient reaching the sample z_k, changes only the path through z.
    """
    num = den = 0.0
    for p in parts:
        g = _groups(log_w.detach(), p.group)
        w = torch.softmax(g, dim=1)
        n_groups = g.shape[0]
        num = num + (p.weight / n_groups) * w.pow(2).reshape(log_w.shape)
        den = den + (p.weight / n_groups) * w.reshape(log_w.shape)
    # a weight that underflows to 0 (float32, large k) gets no gradient either way: 0, not 0/0
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))


def _scale_sample_gradients(terms: LogWeightTerms, scale: Tensor) -> None:
    """Multiply the gradient reaching each sample z_k ([n, B, ...]) by ``scale`` ([n, B])."""
    (z,) = terms.z.values()
    if z.requires_grad:
        z.register_hook(lambda g: g * scale.reshape(scale.shape + (1,) * (g.dim() - 2)))


# --- estimation -------------------------------------------------------------------


def _routed_surrogate(targets: Sequence[tuple[Tensor, list[torch.nn.Parameter]]]) -> Tensor:
    """A scalar whose gradient is, for each (value, params) pair, d value / d params.

    Used when encoder and decoder follow different surrogates: each gradient is taken
    here with ``torch.autograd.grad`` and returned as ``sum(p * grad.detach())``.
    """
    total: Tensor | None = None
    live = [(v, [p for p in ps if p.requires_grad]) for v, ps in targets]
    live = [(v, ps) for v, ps in live if ps and v.requires_grad]
    for i, (value, params) in enumerate(live):
        grads = torch.autograd.grad(value, params, retain_graph=i < len(live) - 1, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                term = (p * g.detach()).sum()
                total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def estimate(
    model: LatentVariableModel,
    x: Tensor,
    plan: BoundPlan,
    estimator: str = "standard",
    kl_weight: float = 1.0,
) -> ObjectiveResult:
    """Draw ``plan.n_samples`` per data point once and build the loss for ``estimator``.

    The loss value is minus the batch mean of the (KL-tempered) decoder bound for every
    estimator; ``bound`` is the plan's report bound at KL weight 1.
    """
    ESTIMATORS.check(estimator, "objective.estimator")
    terms = model.log_weight_terms(x, plan.n_samples, stop_posterior_grad=estimator != "standard")
    log_w_train = terms.log_weights(kl_weight)  # [n, B]
    decoder_value = combined_bound(log_w_train, plan.decoder).mean()
    log_w = terms.log_weights().detach()
    report = combined_bound(log_w, plan.report)

    # DReG for one stochastic layer: the STL surrogate, with the gradient reaching z_k
    # rescaled from w~_k to w~_k^2. Exact with any prior (a prior that reuses encoder
    # parameters keeps its w~_k weight) and costs no extra backward pass.
    dreg_by_hook = estimator == "dreg" and len(terms.z) == 1
    if dreg_by_hook:
        _scale_sample_gradients(terms, _dreg_sample_scale(log_w_train, plan.encoder))
    if (estimator != "dreg" or dreg_by_hook) and plan.encoder == plan.decoder:
        return ObjectiveResult(loss=-decoder_value, bound=report, log_w=log_w, terms=terms)

    if estimator == "dreg" and not dreg_by_hook:
        encoder_target = _dreg_surrogate(log_w_train, plan.encoder).mean()
    else:
        encoder_target = combined_bound(log_w_train, plan.encoder).mean()
    enc = model.encoder_parameters()
    if not enc:
        raise ValueError(
            f"{type(model).__name__} has no encoder parameters (none named with a prefix in "
            f"encoder_prefixes={model.encoder_prefixes!r}); estimator {estimator!r} needs them"
        )
    if not torch.is_grad_enabled():
        return ObjectiveResult(loss=-decoder_value, bound=report, log_w=log_w, terms=terms)
    surrogate = _routed_surrogate([(decoder_value, model.decoder_parameters()), (encoder_target, enc)])
    surrogate = surrogate.to(decoder_value)
    loss = -(decoder_value.detach() + surrogate - surrogate.detach())
    return ObjectiveResult(loss=loss, bound=report, log_w=log_w, terms=terms)


# --- the objectives ---------------------------------------------------------------


def vae_plan(k: int) -> BoundPlan:
    """Mean of k single-sample ELBOs (the IWAE paper's "VAE" rows)."""
    parts = (Part(1.0, 1),)
    return BoundPlan(k, parts, parts, parts)


def iwae_plan(k: int) -> BoundPlan:
    """L_k (Burda et al. 2016)."""
    parts = (Part(1.0, k),)
    return BoundPlan(k, parts, parts, parts)


def miwae_plan(k: int, m: int) -> BoundPlan:
    """Mean of m independent L_k's over m * k draws (Rainforth et al. 2018)."""
    parts = (Part(1.0, k),)
    return BoundPlan(m * k, parts, parts, parts)


def ciwae_plan(k: int, beta: float) -> BoundPlan:
    """beta * ELBO + (1 - beta) * L_k on the same k draws (Rainforth et al. 2018)."""
    parts = tuple(p for p in (Part(beta, 1), Part(1.0 - beta, k)) if p.weight != 0.0)
    return BoundPlan(k, parts, parts, parts)


def piwae_plan(k: int, m: int) -> BoundPlan:
    """Decoder on L_{m k}, encoder on MIWAE(m, k), same m * k draws (Rainforth et al. 2018).

    The reported bound is L_{m k}, the generative model's objective.
    """
    decoder = (Part(1.0, m * k),)
    return BoundPlan(m * k, decoder, (Part(1.0, k),), decoder)


def vae_objective(model: LatentVariableModel, x: Tensor, k: int, kl_weight: float = 1.0,
                  estimator: str = "standard") -> ObjectiveResult:
    """Mean of k single-sample ELBOs. With kl_weight < 1 the KL term is scaled down
    (warm-up); the reported bound is always the true ELBO. ``dreg`` equals ``stl`` here."""
    return estimate(model, x, vae_plan(k), estimator, kl_weight)


def iwae_objective(model: LatentVariableModel, x: Tensor, k: int, kl_weight: float = 1.0,
                   estimator: str = "standard") -> ObjectiveResult:
    """L_k. Autograd through logsumexp yields the IWAE gradient sum_k w~_k grad log w_k.

    Warm-up for IWAE tempers each log weight, log p(x|z) + beta (log p(z) - log q(z|x)),
    before the log-mean-exp: at beta = 1 it is L_k, and at beta < 1 the resampling
    weights lean on the likelihood, just as the warmed-up ELBO does.
    """
    return estimate(model, x, iwae_plan(k), estimator, kl_weight)


def miwae_objective(model: LatentVariableModel, x: Tensor, k: int, kl_weight: float = 1.0,
                    estimator: str = "standard", m: int = 1) -> ObjectiveResult:
    """MIWAE(m, k): m = 1 is IWAE(k), k = 1 is VAE(m)."""
    return estimate(model, x, miwae_plan(k, m), estimator, kl_weight)


def ciwae_objective(model: LatentVariableModel, x: Tensor, k: int, kl_weight: float = 1.0,
                    estimator: str = "standard", beta: float = 0.5) -> ObjectiveResult:
    """CIWAE(beta): beta = 0 is IWAE(k), beta = 1 is VAE(k)."""
    return estimate(model, x, ciwae_plan(k, beta), estimator, kl_weight)


def piwae_objective(model: LatentVariableModel, x: Tensor, k: int, kl_weight: float = 1.0,
                    estimator: str = "standard", m: int = 1) -> ObjectiveResult:
    """PIWAE(m, k): the decoder follows L_{m k}, the encoder MIWAE(m, k)."""
    return estimate(model, x, piwae_plan(k, m), estimator, kl_weight)


#: an objective as the trainer calls it: (model, x, kl_weight) -> ObjectiveResult
Objective = Callable[[LatentVariableModel, Tensor, float], ObjectiveResult]

#: ``objective.name`` -> the plan its config describes
OBJECTIVES: Registry[Callable[[ObjectiveConfig], BoundPlan]] = Registry("objective", {
    "vae": lambda c: vae_plan(c.k),
    "iwae": lambda c: iwae_plan(c.k),
    "miwae": lambda c: miwae_plan(c.k, c.m),
    "ciwae": lambda c: ciwae_plan(c.k, c.beta),
    "piwae": lambda c: piwae_plan(c.k, c.m),
})


def make_objective(cfg: ObjectiveConfig) -> Objective:
    """Bind an objective config (name, k, estimator, m, beta) into the callable the trainer steps with."""
    plan = OBJECTIVES.get_checked(cfg.name, "objective.name")(cfg)
    estimator = ESTIMATORS.check(cfg.estimator, "objective.estimator")

    def objective(model: LatentVariableModel, x: Tensor, kl_weight: float = 1.0) -> ObjectiveResult:
        return estimate(model, x, plan, estimator, kl_weight)

    return objective
