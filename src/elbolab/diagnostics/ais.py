"""Annealed importance sampling (Neal 2001) of log p(x), and bidirectional Monte Carlo (Grosse et al. 2015).

The path is geometric, f_b(z) = q0(z) * exp(b * l(z)) with l = log p(x, z) - log q0(z),
b rising from 0 to 1 over ``steps`` intermediate distributions; q0 is either

* ``encoder``: a diagonal Gaussian over the whole flat latent, the encoder's q(z|x) for a
  one-layer model (moment-matched to the encoder's samples for a multi-layer one), or
* ``prior``: the model's prior over every layer, with l = log p(x | z) (Wu et al. 2017).

Each chain starts with an exact draw from q0, then alternates a weight update
log w += (b_t - b_{t-1}) l(z) with one HMC transition that leaves f_{b_t} invariant
(:mod:`.hmc`). exp(log w) is an unbiased estimate of p(x), so log mean_c w_c is a
stochastic lower bound on log p(x) that tightens as ``steps`` grows.

BDMC runs the same chain backwards from an exact posterior sample, which exists for
data simulated from the model (the z that generated x): its weights estimate 1/p(x)
without bias, so -log mean_c w_c is a stochastic upper bound. The two sandwich log p(x);
their difference bounds the forward estimator's own error on such data.
Everything is batched: ``chains x points`` rows go through the model at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import limits
from ..errors import ConfigError
from ..evaluation import batches, eval_mode, model_device, model_dtype, seeded
from ..registry import Registry
from .hmc import Point, StepSizes, hmc_step
from .local_opt import encoder_gaussian, frozen, progress_bar

#: ``schedule`` -> b_0 = 0 < ... < b_T = 1 for T intermediate distributions
SCHEDULES: Registry = Registry("AIS schedule")


def linear_schedule(steps: int) -> Tensor:
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


def sigmoid_schedule(steps: int, sharpness: float = 4.0) -> Tensor:
    """Denser at both ends, where f changes fastest (Grosse et al. 2015's sigmoidal schedule)."""
    s = torch.sigmoid(torch.linspace(-sharpness, sharpness, steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


SCHEDULES.update({"sigmoid": sigmoid_schedule, "linear": linear_schedule})
STARTS = ("encoder", "prior")


@dataclass
class AISSettings:
    #: intermediate distributions T (the papers use thousands)
    steps: int = 1000
    #: independent chains per data point
    chains: int = 16
    #: extra chains per point that adapt the step sizes and are then discarded (see _run)
    pilot_chains: int = 2
    leapfrog: int = 10
    start: str = "encoder"
    schedule: str = "sigmoid"
    target_acceptance: float = 0.65
    initial_step_size: float = 0.05
    #: data points per batch (chains x batch rows per network pass)
    batch_size: int = 100

    def check(self) -> None:
        """Counts within the project's limits (limits.py), rates finite: a :class:`ConfigError`
        (a ValueError) naming the setting, before anything is computed."""
        limits.count(self.steps, "AIS steps", limits.MAX_EPOCHS)
        limits.count(self.chains, "AIS chains", limits.MAX_EVAL_SAMPLES)
        limits.count(self.pilot_chains, "AIS pilot_chains", limits.MAX_EVAL_SAMPLES, lo=0)
        limits.count(self.leapfrog, "AIS leapfrog", limits.MAX_EPOCHS)
        limits.count(self.batch_size, "AIS batch_size", limits.MAX_BATCH)
        limits.positive_number(self.initial_step_size, "AIS initial_step_size")
        if self.start not in STARTS:
            raise ConfigError(f"AIS start must be one of {STARTS}, got {self.start!r}")
        SCHEDULES.check(self.schedule, "AIS schedule")
        if not 0.0 < self.target_acceptance < 1.0:
            raise ConfigError(f"AIS target_acceptance must be in (0, 1), got {self.target_acceptance}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AISResult:
    #: [C, N] float64 log weights; forward: log of unbiased estimates of p(x), reverse: of 1/p(x)
    log_weights: Tensor
    #: [N] average HMC acceptance probability per point (over chains and transitions)
    acceptance: Tensor
    settings: AISSettings
    reverse: bool = False

    @property
    def per_point(self) -> Tensor:
        """``[N]``: log mean_c w_c (forward: a stochastic lower bound on log p(x)), or minus
        that (reverse: a stochastic upper bound)."""
        est = torch.logsumexp(self.log_weights, 0) - math.log(self.log_weights.shape[0])
        return -est if self.reverse else est

    def to_dict(self) -> dict:
        p = self.per_point
        n = p.numel()
        return {"mean": float(p.mean()), "stderr": float(p.std() / math.sqrt(n)) if n > 1 else float("nan"),
                "n": n, "reverse": self.reverse, "acceptance": float(self.acceptance.mean()),
                "chain_log_weight_std": float(self.log_weights.std(0).mean()) if self.log_weights.shape[0] > 1
                else float("nan"), **self.settings.to_dict()}


class AnnealedTarget:
    """The geometric path's densities for a batch ``x`` ``[B, Dx]`` at chains ``[C, B, D]``.

    ``point(z, b)`` returns f_b with extras (base, l, grad base, grad l) at z, so that
    ``at(point, b')`` moves to another temperature without a network pass.
    """

    def __init__(self, model, x: Tensor, start: str, chains: int) -> None:
        self.model, self.x, self.start = model, x, start
        if start == "encoder":
            self.q0 = encoder_gaussian(model, x)  # [B, D] parameters
        elif start != "prior":
            raise ValueError(f"AIS start must be one of {STARTS}, got {start!r}")
        self.chains = chains

    def sample_start(self) -> Tensor:
        """Exact draws from q0, ``[C, B, D]`` (C counting the pilot chains)."""
        if self.start == "encoder":
            return self.q0.rsample(self.chains)
        n = self.chains * self.x.shape[0]
        z = self.model.sample_z(n)
        return z.reshape(self.chains, self.x.shape[0], -1).to(self.x.dtype)

    def parts(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log q0, l, d log q0 / dz, dl / dz) at z."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            if self.start == "encoder":
                log_joint = self.model.log_joint(self.x, z)
                (g_joint,) = torch.autograd.grad(log_joint.sum(), z)
                with torch.no_grad():
                    base = self.q0.log_prob(z)
                    g_base = -(z - self.q0.mean) * torch.exp(-self.q0.log_var)
                return base.detach(), (log_joint - base).detach(), g_base, g_joint - g_base
            base = self.model.log_p_z(z)
            ll = self.model.log_p_x_given_z(self.x, z)
            (g_base,) = torch.autograd.grad(base.sum(), z, retain_graph=True)
            (g_ll,) = torch.autograd.grad(ll.sum(), z)
            return base.detach(), ll.detach(), g_base, g_ll

    def point(self, z: Tensor, b: float) -> Point:
        base, ll, g_base, g_ll = extras = self.parts(z)
        return Point(z.detach(), base + b * ll, g_base + b * g_ll, extras)

    @staticmethod
    def at(p: Point, b: float) -> Point:
        base, ll, g_base, g_ll = p.extras
        return Point(p.z, base + b * ll, g_base + b * g_ll, p.extras)


def _run(target: AnnealedTarget, z0: Tensor, betas: Tensor, s: AISSettings, bar) -> tuple[Tensor, Tensor]:
    """One batch of chains along ``betas`` (rising for a forward run, falling for a reverse one):
    log w ``[C, B]`` float64 and the mean acceptance per point ``[B]``.

    ``z0`` holds C chains then ``s.pilot_chains`` pilot chains per point. Only the pilots
    adapt their step sizes to their own acceptance; the C chains whose weights count use
    the pilots' (geometric mean) step size. A step size chosen from a chain's own past
    makes its kernel depend on its state, and AIS is then no longer unbiased; chosen by
    independent chains, it is a fixed sequence as far as each counted chain is concerned.
    """
    c = s.chains
    b_prev = float(betas[0])
    p = target.point(z0, b_prev)
    log_w = torch.zeros(c, *p.log_f.shape[1:], dtype=torch.float64, device=z0.device)
    steps = StepSizes.constant(tuple(p.log_f.shape), s.initial_step_size, z0.dtype, z0.device,
                               target_acceptance=s.target_acceptance, adapt=s.pilot_chains > 0)
    betas_list = betas.tolist()
    last = len(betas_list) - 1
    for t in range(1, len(betas_list)):
        b = betas_list[t]
        log_w += (b - b_prev) * p.extras[1][:c].double()
        if t < last:  # the transition after the final weight update cannot change the weight
            p, steps = hmc_step(target.at(p, b), lambda z, b=b: target.point(z, b), steps, s.leapfrog)
            if s.pilot_chains:
                shared = steps.size[c:].log().mean(0).exp()  # [B]
                steps = replace(steps, size=torch.cat([shared.expand(c, -1), steps.size[c:]]))
        b_prev = b
        if bar is not None:
            bar.update(1)
    return log_w, steps.mean_acceptance()[:c].mean(0).float()


def _batches_of(x: Tensor, z: Tensor | None, size: int) -> Iterator[tuple[slice, Tensor, Tensor | None]]:
    for sl in batches(x.shape[0], size):
        yield sl, x[sl], (z[sl] if z is not None else None)


@torch.no_grad()
def ais(model, data: Tensor, settings: AISSettings | None = None, *, posterior_z: Tensor | None = None,
        seed: int | None = 0, progress: bool = False) -> AISResult:
    """AIS for every row of ``data`` ``[N, Dx]``.

    Forward (default): chains start from q0 and the result's ``per_point`` is a stochastic
    lower bound on log p(x). With ``posterior_z`` ``[N, D_total]`` (an exact posterior
    sample per point, e.g. the latent that generated a simulated x) the chains run in
    reverse from it and ``per_point`` is a stochastic upper bound.
    """
    s = settings or AISSettings()
    s.check()
    device = model_device(model)
    dtype = model_dtype(model) or data.dtype
    betas = SCHEDULES[SCHEDULES.canonical(s.schedule)](s.steps)
    reverse = posterior_z is not None
    if reverse:
        betas = betas.flip(0)
    log_w = torch.empty(s.chains, data.shape[0], dtype=torch.float64)
    acceptance = torch.empty(data.shape[0])
    n_batches = math.ceil(data.shape[0] / s.batch_size)
    bar = progress_bar(progress, total=n_batches * s.steps, desc="AIS (reverse)" if reverse else "AIS")
    with seeded(seed, device), eval_mode(model), frozen(model):
        for sl, x, zp in _batches_of(data, posterior_z, s.batch_size):
            x = x.to(device, dtype)
            target = AnnealedTarget(model, x, s.start, s.chains + s.pilot_chains)
            if reverse:
                z0 = zp.to(device, dtype).unsqueeze(0).expand(target.chains, -1, -1).contiguous()
            else:
                z0 = target.sample_start()
            lw, acc = _run(target, z0, betas, s, bar)
            log_w[:, sl] = lw.cpu()
            acceptance[sl] = acc.cpu()
    if bar is not None:
        bar.close()
    return AISResult(log_w, acceptance, s, reverse)


@dataclass
class BDMCResult:
    """The sandwich on simulated data: ``lower`` (forward AIS) <= log p(x) <= ``upper`` (reverse AIS),
    each stochastic; ``data`` ``[N, Dx]`` and ``z`` ``[N, D_total]`` are the simulated pairs."""

    lower: AISResult
    upper: AISResult
    data: Tensor
    z: Tensor

    def gap(self) -> Tensor:
        """``[N]`` upper - lower per point, nats."""
        return self.upper.per_point - self.lower.per_point

    def to_dict(self) -> dict:
        g = self.gap()
        n = g.numel()
        return {"lower": self.lower.to_dict(), "upper": self.upper.to_dict(), "gap_mean": float(g.mean()),
                "gap_stderr": float(g.std() / math.sqrt(n)) if n > 1 else float("nan"), "n": n}


@torch.no_grad()
def simulate(model, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` pairs (x, z) drawn from the model: z ~ p(z) over every layer, x ~ p(x | z)."""
    device = model_device(model)
    with seeded(seed, device), eval_mode(model):
        z = model.sample_z(n)
        x = model.sample_x_given_z(z)
    return x.detach(), z.detach()


def bdmc(model, n: int, settings: AISSettings | None = None, seed: int = 0, progress: bool = False) -> BDMCResult:
    """Bidirectional Monte Carlo on ``n`` points simulated from the model."""
    x, z = simulate(model, n, seed)
    lower = ais(model, x, settings, seed=seed + 1, progress=progress)
    upper = ais(model, x, settings, posterior_z=z, seed=seed + 2, progress=progress)
    return BDMCResult(lower, upper, x.cpu(), z.cpu())


def implicit_log_likelihood(model, data: Tensor, seed: int | None = 0, progress: bool = False,
                            batch_size: int = 100) -> AISResult:
    """log p(x) of a model whose q(z|x) has no density (models.avb): forward AIS started from
    its adaptive-contrast Gaussian r(z|x) (``model.posterior``), with the intermediate
    distributions, chains and leapfrog steps of its config (``model.ais_settings``)."""
    s = AISSettings(**model.ais_settings, start="encoder", batch_size=batch_size)
    return ais(model, data, s, seed=seed, progress=progress)
