"""The optimal local posterior q* (Cremer, Li & Duvenaud 2018): per data point, the member of a
variational family that maximizes that point's ELBO, found by optimizing the family's
parameters for that point alone, started at the encoder's output.

A family is two functions (:class:`Family`): ``init(model, x)`` -> per-point parameters
(name -> ``[B, ...]``) and ``log_weights(model, x, k, params)`` -> ``[K, B]``
reparameterized log p(x, z) - log q(z). Registered families:

* ``encoder``: the encoder's own family with every per-point output freed
  (``model.local_posterior`` / ``model.log_weights_local``). For a one-layer model that is
  the diagonal Gaussian N(mu, sigma^2) itself; a multi-layer model frees the first-sampled
  layer's Gaussian and per-point shifts of the conditional layers' means and
  log-variances, their dependence on the sampled layer kept. Started at the encoder, it
  contains q_phi(.|x), so ELBO(q*) >= ELBO(q_phi) up to Monte Carlo error.
* ``gaussian``: a diagonal Gaussian over the whole flat latent (every layer), Cremer et
  al.'s fully factorized q_FFG; the same as ``encoder`` for one-layer models.

A richer family (a flow) registers the same two functions over ``model.log_joint``.

All points of a batch are optimized at once as one tensor per parameter, by an Adam
written out so that each point has its own learning rate and its own stopping time:
every ``check_every`` steps a point's average ELBO over the window is compared with its
best; after ``patience`` windows without improvement its learning rate drops by
``lr_decay``, and once it drops below ``min_lr`` the point stops (its parameters are no
longer updated). The ELBO of the result is then estimated with fresh samples.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import limits
from ..distributions import DiagonalGaussian
from ..errors import ConfigError
from ..evaluation import batches, eval_mode, model_device, model_dtype, seeded
from ..priors import GaussianMixturePrior
from ..progress import Progress
from ..registry import Registry


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "it") -> Progress | None:
    """A bar on a terminal, a line every few seconds in a log (:class:`~elbolab.progress.Progress`),
    or None when progress is off."""
    return Progress(total, desc, unit) if enabled else None


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """Hold the model's parameters out of autograd (gradients are only wanted in z or in q's
    parameters), restoring each parameter's flag afterwards; a mixture prior's components
    (a VampPrior's encoder pass over its pseudo-inputs) are computed once for the block."""
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    prior = getattr(model, "prior", None)
    try:
        with prior.frozen_components() if isinstance(prior, GaussianMixturePrior) else contextlib.nullcontext():
            yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


@torch.no_grad()
def encoder_gaussian(model, x: Tensor, k: int = 256) -> DiagonalGaussian:
    """A diagonal Gaussian over the flat latent ``[B, D_total]`` standing for q_phi(z|x): the
    encoder's own for a one-layer model, else the mean and variance of k of its samples."""
    if len(model.latent_dims) == 1:
        return model.posterior(x)
    z = model.flatten_latents(model.log_weight_terms(x, k).z)  # [k, B, D]
    return DiagonalGaussian(z.mean(0), torch.log(z.var(0).clamp_min(1e-12)))


@dataclass(frozen=True)
class Family:
    description: str
    init: Callable[..., dict[str, Tensor]]
    log_weights: Callable[..., Tensor]


def _gaussian_init(model, x: Tensor) -> dict[str, Tensor]:
    q = encoder_gaussian(model, x)
    return {"mean": q.mean, "log_var": q.log_var}


def _gaussian_log_weights(model, x: Tensor, k: int, params: dict[str, Tensor]) -> Tensor:
    q = DiagonalGaussian(params["mean"], params["log_var"])
    z = q.rsample(k)
    return model.log_joint(x, z) - q.log_prob(z)


#: ``--family`` -> how its per-point parameters start and how they give log weights
FAMILIES: Registry[Family] = Registry("q* family", {
    "encoder": Family("the encoder's family, every per-point output freed",
                      lambda model, x: model.local_posterior(x),
                      lambda model, x, k, params: model.log_weights_local(x, k, params)),
    "gaussian": Family("a diagonal Gaussian over every latent layer (q_FFG)", _gaussian_init, _gaussian_log_weights),
})


@dataclass
class LocalOptSettings:
    #: samples per step of the ELBO whose gradient is followed
    samples: int = 20
    lr: float = 1e-2
    lr_decay: float = 0.1
    #: a point stops when its learning rate would fall below this
    min_lr: float = 1e-4
    check_every: int = 50
    #: windows without a better average ELBO before the learning rate drops
    patience: int = 5
    max_steps: int = 10_000
    #: fresh samples for the final ELBO estimate
    eval_samples: int = 1000
    #: points optimized together
    batch_size: int = 100
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def check(self) -> None:
        """Every count within the project's limits (limits.py) and every rate finite: a
        :class:`ConfigError` (a ValueError) naming the setting, before anything is computed."""
        limits.count(self.samples, "q* samples", limits.MAX_SAMPLES)
        for name in ("check_every", "patience", "max_steps"):
            limits.count(getattr(self, name), f"q* {name}", limits.MAX_EPOCHS)
        limits.count(self.eval_samples, "q* eval_samples", limits.MAX_EVAL_SAMPLES)
        limits.count(self.batch_size, "q* batch_size", limits.MAX_BATCH)
        for name in ("lr", "min_lr", "eps"):
            limits.positive_number(getattr(self, name), f"q* {name}")
        if not (0 < self.lr_decay < 1 and self.min_lr <= self.lr and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"q*: need 0 < lr_decay < 1, min_lr <= lr and betas in [0, 1), got {self}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LocalOptResult:
    #: [N] float64 ELBO(q*) per point (eval_samples fresh samples), nats
    elbo: Tensor
    #: [N] Monte Carlo standard error of each point's ELBO estimate
    elbo_mc_stderr: Tensor
    #: [N] optimization steps each point took
    steps: Tensor
    #: [N] whether the point stopped by the plateau rule (not by max_steps)
    converged: Tensor
    #: the optimized parameters, name -> [N, ...] (CPU)
    params: dict[str, Tensor]
    family: str
    settings: LocalOptSettings


@torch.no_grad()
def elbo_estimate(log_weights: Callable[[int], Tensor], k: int, chunk: int = 100) -> tuple[Tensor, Tensor]:
    """Mean of ``k`` single-sample ELBO terms per point and its Monte Carlo standard error,
    drawn ``chunk`` at a time from ``log_weights(c) -> [c, B]``: ``[B]`` float64 each."""
    total = sq = None
    for sl in batches(k, chunk):
        lw = log_weights(sl.stop - sl.start).double()
        s, s2 = lw.sum(0), lw.pow(2).sum(0)
        total, sq = (s, s2) if total is None else (total + s, sq + s2)
    mean = total / k
    var = (sq / k - mean.pow(2)).clamp_min(0.0) * k / max(k - 1, 1)
    return mean, (var / k).sqrt()


def _adam_step(params: dict[str, Tensor], state: dict[str, tuple[Tensor, Tensor]], t: int, lr: Tensor,
               active: Tensor, s: LocalOptSettings) -> None:
    """In-place Adam on every parameter ``[B, ...]`` with per-point learning rates ``lr`` ``[B]``;
    points not ``active`` ``[B]`` keep their values."""
    b1, b2 = s.betas
    for name, p in params.items():
        m, v = state[name]
        g = p.grad
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        shape = (-1,) + (1,) * (p.dim() - 1)
        step = (lr * active).view(shape).to(p.dtype) / (1 - b1**t)
        p.data.sub_(step * m / ((v / (1 - b2**t)).sqrt() + s.eps))
        p.grad = None


def _optimize_batch(model, x: Tensor, family: Family, s: LocalOptSettings, bar) -> tuple[dict, Tensor, Tensor]:
    params = {n: p.detach().clone().requires_grad_(True) for n, p in family.init(model, x).items()}
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    b = x.shape[0]
    lr = torch.full((b,), s.lr, dtype=torch.float64, device=x.device)
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    best = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    bad = torch.zeros(b, dtype=torch.long, device=x.device)
    steps = torch.zeros(b, dtype=torch.long, device=x.device)
    window = torch.zeros(b, dtype=torch.float64, device=x.device)
    for t in range(1, s.max_steps + 1):
        # only the points still running go through the model
        idx = None if bool(active.all()) else active.nonzero().squeeze(1)
        with torch.enable_grad():
            sub = params if idx is None else {n: p[idx] for n, p in params.items()}
            elbo = family.log_weights(model, x if idx is None else x[idx], s.samples, sub).mean(0)  # [B_active]
            # a sum over points: each point's parameters get the gradient of its own ELBO
            (-elbo.sum()).backward()
        _adam_step(params, state, t, lr, active, s)
        steps += active
        window.index_add_(0, torch.arange(b, device=x.device) if idx is None else idx, elbo.detach().double())
        if t % s.check_every == 0:
            avg = window / s.check_every
            window.zero_()
            better = avg > best
            best = torch.where(better, avg, best)
            bad = torch.where(better, torch.zeros_like(bad), bad + 1)
            decay = active & (bad >= s.patience)
            lr = torch.where(decay, lr * s.lr_decay, lr)
            bad = torch.where(decay, torch.zeros_like(bad), bad)
            stop = active & (lr < s.min_lr * (1 - 1e-9))
            active &= ~stop
            if bar is not None:
                bar.set_postfix(step=f"{t}/{s.max_steps}", running=int(active.sum()))  # moves while none stop
                bar.update(int(stop.sum()))
            if not active.any():
                break
    if bar is not None:
        bar.update(int(active.sum()))
    return {n: p.detach() for n, p in params.items()}, steps, ~active


def optimize_local(model, data: Tensor, family: str = "encoder", settings: LocalOptSettings | None = None,
                   seed: int | None = 0, progress: bool = False) -> LocalOptResult:
    """q* for every row of ``data`` ``[N, Dx]`` and its ELBO, batched and chunked."""
    s = settings or LocalOptSettings()
    s.check()
    fam = FAMILIES.get_checked(family, "q* family")
    device = model_device(model)
    dtype = model_dtype(model) or data.dtype
    n = data.shape[0]
    elbo = torch.empty(n, dtype=torch.float64)
    mc = torch.empty(n, dtype=torch.float64)
    steps = torch.empty(n, dtype=torch.long)
    converged = torch.empty(n, dtype=torch.bool)
    out_params: dict[str, list[Tensor]] = {}
    bar = progress_bar(progress, n, f"q* ({family})", "points")
    with seeded(seed, device), eval_mode(model), frozen(model):
        for sl in batches(n, s.batch_size):
            x = data[sl].to(device, dtype)
            params, st, conv = _optimize_batch(model, x, fam, s, bar)
            e, se = elbo_estimate(lambda c, x=x, params=params: fam.log_weights(model, x, c, params), s.eval_samples)
            elbo[sl], mc[sl], steps[sl], converged[sl] = e.cpu(), se.cpu(), st.cpu(), conv.cpu()
            for name, p in params.items():
                out_params.setdefault(name, []).append(p.cpu())
    if bar is not None:
        bar.close()
    return LocalOptResult(elbo, mc, steps, converged, {k: torch.cat(v) for k, v in out_params.items()}, family, s)
