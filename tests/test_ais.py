"""HMC, AIS and BDMC against exact answers.

* HMC: chains started far from a correlated 2-D Gaussian reproduce its mean and covariance
  (final states of independent chains are independent draws: standard errors are exact).
* AIS on the linear-Gaussian model, whose log p(x) is closed form: converges to it as the
  number of intermediate distributions grows, and is never above it beyond Monte Carlo error.
* BDMC on data simulated from that model: the reverse bound is above log p(x), the forward
  one below, and the sandwich narrows with more distributions.
* AIS through the flat-latent protocol of a hierarchical model agrees with importance
  sampling through its encoder (two independent code paths to the same log p(x)).
"""

from __future__ import annotations

import math

import pytest
import torch
from _diag_models import correlated_linear_gaussian, simulated

from elbolab.config import RunConfig
from elbolab.diagnostics.ais import AISSettings, ais, bdmc
from elbolab.diagnostics.hmc import Point, StepSizes, hmc_step
from elbolab.evaluation import log_likelihood
from elbolab.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.45], [0.45, 0.25]], dtype=torch.float64)  # correlation 0.9


def gaussian_target(z: torch.Tensor) -> Point:
    prec = torch.linalg.inv(COV)
    d = z - MEAN
    return Point(z, -0.5 * ((d @ prec) * d).sum(-1), -(d @ prec))


def test_hmc_chains_reproduce_a_correlated_gaussian():
    torch.manual_seed(0)
    n = 4000
    p = gaussian_target(torch.full((n, 2), 4.0, dtype=torch.float64))  # far from the mass
    steps = StepSizes.constant((n,), 0.05, torch.float64)
    for _ in range(150):  # burn-in, adapting towards 0.65 acceptance
        p, steps = hmc_step(p, gaussian_target, steps, leapfrog=5)
    steps.adapt = False
    for _ in range(150):
        p, steps = hmc_step(p, gaussian_target, steps, leapfrog=5)
    assert 0.5 < float(steps.mean_acceptance().mean()) < 0.9
    z = p.z
    se_mean = COV.diagonal().sqrt() / math.sqrt(n)
    assert ((z.mean(0) - MEAN) / se_mean).abs().max() < 4
    var = COV.diagonal()
    se_cov = ((var[:, None] * var[None, :] + COV**2) / n).sqrt()
    assert ((torch.cov(z.T) - COV) / se_cov).abs().max() < 4


def error_and_stderr(est: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    d = (est - truth).detach()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


@pytest.mark.parametrize("start", ["prior", "encoder"])
def test_ais_converges_to_the_exact_log_marginal(start):
    m = correlated_linear_gaussian()
    x = simulated(m, 20)
    exact = m.log_marginal(x)
    errors = {}
    for steps in (10, 300):
        res = ais(m, x, AISSettings(steps=steps, chains=32, leapfrog=3, start=start), seed=1)
        err, se = error_and_stderr(res.per_point, exact)
        assert err < 3 * se, (steps, err, se)  # a lower bound: never above beyond MC error
        errors[steps] = (err, se)
    # at 10 distributions the bound is loose; at 300 it is exact within MC error (20 points,
    # 32 chains each; the log of a 32-chain mean is low by about var(log w) / 64 < 0.02 nats)
    assert errors[10][0] < -0.2
    assert abs(errors[300][0]) < 3 * errors[300][1] + 0.02
    assert errors[300][1] < 0.03


def test_bdmc_sandwiches_log_p_and_narrows_with_more_distributions():
    m = correlated_linear_gaussian()
    gaps = {}
    for steps in (10, 300):
        res = bdmc(m, 20, AISSettings(steps=steps, chains=8, leapfrog=3, start="prior"), seed=7)
        exact = m.log_marginal(res.data)
        lo, lo_se = error_and_stderr(res.lower.per_point, exact)
        hi, hi_se = error_and_stderr(res.upper.per_point, exact)
        assert lo < 3 * lo_se and hi > -3 * hi_se, (steps, lo, hi)
        gaps[steps] = float(res.gap().mean())
    assert gaps[10] > 1.0
    assert gaps[300] < 0.1 * gaps[10]


def test_ais_through_a_hierarchical_models_flat_latent_matches_importance_sampling():
    """AIS reads log p(z) and log p(x|z) over [z1, z2]; IS reads the encoder's log weights."""
    cfg = RunConfig().with_overrides({
        "model.name": "hierarchical", "model.hierarchical.latent_dims": [2, 2], "model.hierarchical.width": 16,
        "model.prior.name": "vampprior", "model.prior.components": 5,
    })
    torch.manual_seed(0)
    model = build_model(cfg.model, 20, torch.rand(50, 20).round()).double()
    x = torch.rand(8, 20).round().double()
    is_est = log_likelihood(model, x, k=20_000, chunk_size=1000, seed=0).per_point
    res = ais(model, x, AISSettings(steps=200, chains=16, leapfrog=3, start="prior"), seed=1)
    err, se = error_and_stderr(res.per_point, is_est)
    assert abs(err) < 3 * se + 0.02, (err, se)
