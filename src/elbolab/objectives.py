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
- ``dreg``: encoder gradient sum_k w~_k^2 (d log w_k / dz_k)(dz_k / dphi) plus
  sum_k w~_k d log p(z_k) / dphi for a prior that reuses encoder parameters (a VampPrior
  reads q at its pseudo-inputs), unbiased (Tucker et al. 2018); the decoder gradient is
  the standard one.

Why those weights: the standard gradient of one group is sum_k w~_k (path_k + prior_k -
score_k), with path_k the gradient through the sample z_k, prior_k the prior's direct
parameter gradient and score_k = d log q(z_k) / dphi at fixed z_k. Reparameterizing
E[w~_k score_k] gives E[(w~_k - w~_k^2) path_k]: the score term trades for a change of
the weight on the path only, and prior_k keeps w~_k. Over a plan's parts the bound's
weight on draw k is c_k = sum of weight * w~_k / groups, and d_k is the same with
w~_k^2. The path weight is a_k = d_k; under KL warm-up (beta on log p(z) - log q) only
beta of the score term is in the bound, so a_k = c_k - beta (c_k - d_k).

How DReG is computed: with one stochastic layer (``terms.z`` holds one sample tensor),
the STL surrogate (weights c_k) is used and a hook rescales the gradient reaching each
sample z_k by a_k / c_k, so the prior's direct gradient keeps c_k and no extra backward
pass is needed. With several layers a later sample depends on an earlier one and a
per-sample hook would rescale that path twice, so the encoder follows
sum_k a_k log w_k (STL terms), which puts a_k on the prior's direct gradient too, plus
sum_k (c_k - a_k) beta log p(z_top,k) with ``model.prior`` evaluated again at the
detached top-layer sample, whose gradient is the prior's direct gradient alone. The top
layer is ``model.prior_layer``, a key of ``terms.z``; ``model.prior.log_prob`` at that
sample must be the ``terms.log_prior`` term of that layer, and every other log p term
must use generative (non-encoder) parameters only. (A partial derivative with respect to
the sample tensor would avoid evaluating the prior twice, but under torch.compile the
sample and the log prior leave one fused graph as siblings, so it would come back zero.)

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


def _draw_weights(log_w: Tensor, parts: Sequence[Part]) -> tuple[Tensor, Tensor]:
    """[n, B] -> (c, d), each [n, B]: the bound's weight on each draw's log weight,
    c_k = sum over parts of weight * w~_k / groups, and DReG's, with w~_k^2 for w~_k."""
    c = d = torch.zeros_like(log_w)
    for p in parts:
        g = _groups(log_w.detach(), p.group)
        w = torch.softmax(g, dim=1)
        share = p.weight / g.shape[0]
        c = c + share * w.reshape(log_w.shape)
        d = d + share * w.pow(2).reshape(log_w.shape)
    return c, d


def _dreg_path_weights(log_w: Tensor, parts: Sequence[Part], kl_weight: float | Tensor) -> tuple[Tensor, Tensor]:
    """[n, B] -> (c, a): the bound's weight on draw k and DReG's weight on the path through
    its sample, a_k = c_k - beta (c_k - d_k) (only beta of the score term is in a tempered bound)."""
    c, d = _draw_weights(log_w, parts)
    if isinstance(kl_weight, float | int) and kl_weight == 1.0:
        return c, d
    return c, c - kl_weight * (c - d)


def _dreg_sample_scale(log_w: Tensor, parts: Sequence[Part], kl_weight: float | Tensor = 1.0) -> Tensor:
    """[n, B]: the factor a_k / c_k that turns the bound's weight on the gradient reaching
    sample z_k into DReG's path weight (see the module docstring)."""
    c, a = _dreg_path_weights(log_w, parts, kl_weight)
    # a weight that underflows to 0 (float32, large k) gets no gradient either way: 0, not 0/0
    return torch.where(c > 0, a / c.clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(c))


def _dreg_routed_target(model: LatentVariableModel, terms: LogWeightTerms, log_w: Tensor,
                        parts: Sequence[Part], kl_weight: float | Tensor) -> Tensor:
    """Scalar whose encoder gradient is DReG's for several stochastic layers (batch mean).

    ``log_w`` ([n, B], KL-tempered) must come from ``stop_posterior_grad`` terms. Its
    value is not a bound; only its gradient is used.
    """
    layer, prior = model.prior_layer, getattr(model, "prior", None)
    if prior is None or layer not in terms.z:
        raise ValueError(
            f"{type(model).__name__}: multi-layer DReG evaluates model.prior at the sample "
            f"z[prior_layer={layer!r}] (samples: {sorted(terms.z)}); set prior and prior_layer"
        )
    c, a = _dreg_path_weights(log_w, parts, kl_weight)
    # the prior at the fixed sample: only its own (possibly encoder) parameters carry a gradient
    prior_direct = prior.log_prob(terms.z[layer].detach())  # [n, B]
    return ((a * log_w).sum(0) + ((c - a) * kl_weight * prior_direct).sum(0)).mean()


def _scale_sample_gradients(terms: LogWeightTerms, scale: Tensor) -> None:
    """Multiply the gradient reaching each sample z_k ([n, B, ...]) by ``scale`` ([n, B])."""
    (z,) = terms.z.values()
    if z.requires_grad:
        z.register_hook(lambda g: g * scale.reshape(scale.shape + (1,) * (g.dim() - 2)))


# --- estimation -------------------------------------------------------------------


def _routed_surrogate(targets: Sequence[tuple[Tensor, list[torch.nn.Parameter]]], keep_graph: bool = False
                      ) -> Tensor:
    """A scalar whose gradient is, for each (value, params) pair, d value / d params.

    Used when encoder and decoder follow different surrogates: each gradient is taken
    here with ``torch.autograd.grad`` and returned as ``sum(p * grad.detach())``.
    ``keep_graph`` keeps the forward graph after the last one (a stacked run's other runs need it).
    """
    total: Tensor | None = None
    live = [(v, [p for p in ps if p.requires_grad]) for v, ps in targets]
    live = [(v, ps) for v, ps in live if ps and v.requires_grad]
    for i, (value, params) in enumerate(live):
        grads = torch.autograd.grad(value, params, retain_graph=keep_graph or i < len(live) - 1, allow_unused=True)
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
    terms = model.log_weight_terms(x, plan.n_samples, stop_posterior_grad=detaches_posterior(estimator))
    return estimate_from_terms(model, terms, plan, estimator, kl_weight)


def detaches_posterior(estimator: str) -> bool:
    """Whether ``estimator`` evaluates log q at detached variational parameters (STL, DReG)."""
    return estimator != "standard"


def estimate_from_terms(
    model: LatentVariableModel,
    terms: LogWeightTerms,
    plan: BoundPlan,
    estimator: str,
    kl_weight: float = 1.0,
    scale_samples: Callable[[LogWeightTerms, Tensor], None] = _scale_sample_gradients,
    keep_graph: bool = False,
) -> ObjectiveResult:
    """:func:`estimate` on terms already drawn (``plan.n_samples`` per point, log q detached
    as :func:`detaches_posterior` says). A stacked run calls it once per run on that run's
    terms: ``scale_samples`` then collects the DReG factors for one hook on the stack's
    samples, and ``keep_graph`` keeps the shared graph through a routed run's gradients."""
    log_w_train = terms.log_weights(kl_weight)  # [n, B]
    decoder_value = combined_bound(log_w_train, plan.decoder).mean()
    log_w = terms.log_weights().detach()
    report = combined_bound(log_w, plan.report)

    # DReG for one stochastic layer: the STL surrogate with the gradient reaching z_k
    # rescaled to the path weight; costs no extra backward pass
    dreg_by_hook = estimator == "dreg" and len(terms.z) == 1
    if dreg_by_hook:
        scale_samples(terms, _dreg_sample_scale(log_w_train, plan.encoder, kl_weight))
    if (estimator != "dreg" or dreg_by_hook) and plan.encoder == plan.decoder:
        return ObjectiveResult(loss=-decoder_value, bound=report, log_w=log_w, terms=terms)

    enc = model.encoder_parameters()
    if not enc:
        raise ValueError(
            f"{type(model).__name__} has no encoder parameters (none named with a prefix in "
            f"encoder_prefixes={model.encoder_prefixes!r}); estimator {estimator!r} needs them"
        )
    if not torch.is_grad_enabled():
        return ObjectiveResult(loss=-decoder_value, bound=report, log_w=log_w, terms=terms)
    if estimator == "dreg" and not dreg_by_hook:
        encoder_target = _dreg_routed_target(model, terms, log_w_train, plan.encoder, kl_weight)
    else:
        encoder_target = combined_bound(log_w_train, plan.encoder).mean()
    surrogate = _routed_surrogate([(decoder_value, model.decoder_parameters()), (encoder_target, enc)], keep_graph)
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


def objective_plan(cfg: ObjectiveConfig) -> tuple[BoundPlan, str]:
    """The bound plan and the (canonical) gradient estimator an objective config describes."""
    return OBJECTIVES.get_checked(cfg.name, "objective.name")(cfg), ESTIMATORS.check(cfg.estimator,
                                                                                      "objective.estimator")


def make_objective(cfg: ObjectiveConfig) -> Objective:
    """Bind an objective config (name, k, estimator, m, beta) into the callable the trainer steps with."""
    plan, estimator = objective_plan(cfg)

    def objective(model: LatentVariableModel, x: Tensor, kl_weight: float = 1.0) -> ObjectiveResult:
        return estimate(model, x, plan, estimator, kl_weight)

    return objective
