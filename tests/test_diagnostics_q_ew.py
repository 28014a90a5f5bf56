"""q_EW on the linear-Gaussian model, where log p(x), the ELBO and p(z|x) are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _diag_models import data_from
from scipy import stats

from elbolab.bounds import iwae
from elbolab.diagnostics.q_ew import elbo_q_ew_nested, log_ratio_by_integration, q_ew_on_grid, resample, sample_q_ew
from elbolab.models.linear_gaussian import LinearGaussian

KS = (1, 2, 10, 100)


@pytest.fixture(scope="module")
def setup():
    model = LinearGaussian(4, 1, noise_std=0.7, seed=1)  # q(z|x) far from p(z|x): A ~ 0.1, unit variance
    x = data_from(model, 1, seed=3)
    with torch.no_grad():
        exact = {"log_p": float(model.log_marginal(x)), "elbo": float(model.elbo_closed_form(x))}
    return model, x, q_ew_on_grid(model, x[0], ks=KS), exact


def test_grid_holds_q_and_k1_is_q(setup):
    _, _, grid, exact = setup
    assert grid.converged and grid.accuracy <= 1e-3
    assert grid.log_marginal == pytest.approx(exact["log_p"], abs=1e-8)
    assert grid.q_mass == pytest.approx(1.0, abs=1e-9)
    assert grid.elbo(1) == pytest.approx(exact["elbo"], abs=1e-8)


# p(z|x) 15-30x narrower than q(z|x) in every latent dimension (q has unit variance);
# in 2-D a grid of 201 points per axis over q's +-8 SD puts log p(x) 0.046 nats too high
NARROW_KS = (1, 10, 100, 1000, 100_000)
NARROW_TOL = 3e-3


@pytest.fixture(scope="module", params=[1, 2], ids=["1d", "2d"])
def narrow(request, one_thread):
    model = LinearGaussian(3, request.param, noise_std=0.1, seed=0)
    x = data_from(model, 1, seed=1)
    with torch.no_grad():
        exact = {"log_p": float(model.log_marginal(x)), "elbo": float(model.elbo_closed_form(x))}
        _, cov = model.exact_posterior(x)
        q_std = model.posterior(x).std
    assert float((q_std / cov.diagonal().sqrt()).min()) > 15
    return model, x, q_ew_on_grid(model, x[0], ks=NARROW_KS, tol=NARROW_TOL), exact


def test_narrow_posterior_log_p_and_large_k_elbo_match_the_exact_log_p(narrow):
    _, _, grid, exact = narrow
    assert grid.converged and grid.accuracy <= NARROW_TOL
    assert abs(grid.log_marginal - exact["log_p"]) < 0.01
    # at K = 10^5 q_EW is the posterior to < 0.01 nats
    assert abs(grid.elbo(NARROW_KS[-1]) - exact["log_p"]) < 0.01


def test_narrow_posterior_elbo_of_q_ew_stays_below_log_p_and_k1_is_the_closed_form(narrow):
    _, _, grid, exact = narrow
    values = [grid.elbo(k) for k in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert all(v <= exact["log_p"] + grid.accuracy for v in values), (values, exact["log_p"], grid.accuracy)
    assert grid.elbo(1) == pytest.approx(exact["elbo"], abs=1e-6)


def test_reported_accuracy_bounds_the_error_of_a_coarse_grid():
    """Stopped after one doubling from a quarter node per SD, each quantity's error is within its change."""
    model = LinearGaussian(3, 1, noise_std=0.1, seed=0)
    x = data_from(model, 1, seed=1)
    with torch.no_grad():
        log_p, elbo = float(model.log_marginal(x)), float(model.elbo_closed_form(x))
    grid = q_ew_on_grid(model, x[0], ks=(1,), tol=10.0, points_per_sd=0.25)
    assert grid.points_per_sd == 0.5
    assert abs(grid.changes["log_p"]) > 0.01 and abs(grid.changes[1]) > 0.01  # the first grid was off
    assert abs(grid.log_marginal - log_p) < abs(grid.changes["log_p"])
    assert abs(grid.elbo(1) - elbo) < abs(grid.changes[1])


def test_grid_refuses_or_warns_when_the_tolerance_is_not_met():
    model = LinearGaussian(3, 1, noise_std=0.1, seed=0)
    x = data_from(model, 1, seed=1)[0]
    with pytest.raises(ValueError, match=r"differ by .* nats > tol=1e-12 within max_points=400"):
        q_ew_on_grid(model, x, ks=(1, 10), tol=1e-12, max_points=400)
    with pytest.raises(ValueError, match="two resolutions need more than max_points=150"):
        q_ew_on_grid(model, x, ks=(1, 10), max_points=150)
    with pytest.warns(RuntimeWarning, match="not converged"):
        grid = q_ew_on_grid(model, x, ks=(1, 10), tol=1e-12, max_points=400, strict=False)
    assert not grid.converged and grid.accuracy > 1e-12


@pytest.mark.parametrize("k", [2, 3])
def test_ratio_by_integration_matches_the_exact_discrete_expectation(k):
    """For a discrete q, r_K = E[K w / (w + S)] is a finite sum; log weights spread over ~600 nats."""
    g = torch.Generator().manual_seed(0)
    n = 120
    lw = 100 * torch.randn(n, generator=g, dtype=torch.float64)
    log_pi = torch.log_softmax(2 * torch.randn(n, generator=g, dtype=torch.float64), 0)
    pair = torch.logaddexp(lw[:, None], lw[None])  # [n, n] log(w_g + w_h)
    if k == 2:
        exact = math.log(2) + lw + torch.logsumexp(log_pi[None] - pair, 1)
    else:
        joint = log_pi[:, None] + log_pi[None]
        exact = torch.stack([math.log(3) + lw[i] + torch.logsumexp(joint - torch.logaddexp(lw[i], pair), (0, 1))
                             for i in range(n)])
    got = log_ratio_by_integration(lw, log_pi, k)
    assert torch.allclose(got, exact, rtol=0, atol=1e-9)


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
