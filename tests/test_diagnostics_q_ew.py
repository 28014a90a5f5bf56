"""q_EW on the linear-Gaussian model, where log p(x), the ELBO and p(z|x) are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _diag_models import data_from
from scipy import stats

from elbolab.bounds import iwae
from elbolab.diagnostics.q_ew import elbo_q_ew_nested, q_ew_on_grid, resample, sample_q_ew
from elbolab.models.linear_gaussian import LinearGaussian

KS = (1, 2, 10, 100)


@pytest.fixture(scope="module")
def setup():
    model = LinearGaussian(4, 1, noise_std=0.7, seed=1)  # q(z|x) far from p(z|x): A ~ 0.1, unit variance
    x = data_from(model, 1, seed=3)
    with torch.no_grad():
        exact = {"log_p": float(model.log_marginal(x)), "elbo": float(model.elbo_closed_form(x))}
    return model, x, q_ew_on_grid(model, x[0], ks=KS), exact


def test_grid_is_normalized_and_k1_is_q(setup):
    _, _, grid, exact = setup
    assert grid.log_marginal == pytest.approx(exact["log_p"], abs=1e-8)
    for k in KS:
        assert grid.normalization(k) == pytest.approx(1.0, abs=1e-9)
    assert grid.elbo(1) == pytest.approx(exact["elbo"], abs=1e-8)


def test_elbo_of_q_ew_lies_between_l_k_and_log_p_and_rises_with_k(setup):
    model, x, grid, exact = setup
    values = [grid.elbo(k) for k in KS]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] <= exact["log_p"] + 1e-6
    # at K = 100 q_EW has closed > 95% of the ELBO's gap to log p(x)
    assert exact["log_p"] - values[-1] < 0.05 * (exact["log_p"] - exact["elbo"])
    reps = 4000
    for k, v in zip(KS[1:], values[1:], strict=True):
        with torch.no_grad():
            lw = model.log_weights(x, reps * k).reshape(reps, k).T  # [K, reps]
        l_k = iwae(lw)
        mean, se = float(l_k.mean()), float(l_k.std() / math.sqrt(reps))
        assert mean <= v + 4 * se, (k, mean, se, v)


def test_resampled_points_follow_the_integrated_density(setup):
    model, x, grid, _ = setup
    k, n = 5, 20000
    draws = sample_q_ew(model, x, k=k, n=n, seed=7)["z"][:, 0, 0].numpy()
    g = q_ew_on_grid(model, x[0], ks=(k,))
    z = g.axes[0].numpy()
    pdf = torch.exp(g.log_q_ew[k]).numpy()
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(z))])

    def cdf_fn(t):
        return np.interp(t, z, cdf / cdf[-1])

    # Kolmogorov-Smirnov at the 1% level: the exact sampler passes with probability 0.99
    assert stats.kstest(draws, cdf_fn).pvalue > 0.01
    # and it is not q: the same test rejects q itself
    with torch.no_grad():
        q = model.posterior(x)
    assert stats.kstest(draws, "norm", args=(float(q.mean.detach()), float(q.std.detach()))).pvalue < 1e-6


def test_resample_picks_the_only_finite_weight():
    log_w = torch.full((3, 4, 2), -math.inf)
    log_w[:, 2, :] = 0.0
    z = torch.arange(3 * 4 * 2 * 1, dtype=torch.float32).reshape(3, 4, 2, 1)
    assert torch.equal(resample(log_w, z), z[:, 2])


def test_nested_monte_carlo_agrees_with_integration(setup):
    model, x, grid, _ = setup
    for k in (1, 10):
        est = elbo_q_ew_nested(model, x, k=k, draws=400, inner=40, seed=2)
        tol = 4 * float(est.stderr) + float(est.bias_estimate)
        assert abs(float(est.elbo) - grid.elbo(k)) < tol, (k, float(est.elbo), grid.elbo(k), tol)
