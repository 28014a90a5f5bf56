"""Bounds and importance sampling against the linear-Gaussian model's closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from elbolab import bounds
from elbolab.diagnostics import log_likelihood
from elbolab.models.linear_gaussian import LinearGaussian


@pytest.fixture
def model_and_x() -> tuple[LinearGaussian, torch.Tensor]:
    m = LinearGaussian(data_dim=6, latent_dim=3, noise_std=0.8, seed=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64) * 1.5 + m.b.detach()
    return m, x


def _reasonable_q(m: LinearGaussian) -> None:
    """q = exact posterior mean map with the diagonal of the posterior covariance (not exact)."""
    s2 = torch.exp(m.log_noise_var)
    cov = torch.linalg.inv(torch.eye(3, dtype=torch.float64) + m.W.T @ m.W / s2)
    with torch.no_grad():
        m.A.copy_(cov @ m.W.T / s2)
        m.c.copy_(-(cov @ m.W.T @ m.b) / s2)
        m.q_log_var.copy_(torch.log(torch.diagonal(cov)))


def test_mc_elbo_matches_closed_form(model_and_x) -> None:
    m, x = model_and_x
    lw = m.log_weights(x, 20000).detach()
    est, se = lw.mean(0), lw.std(0) / math.sqrt(lw.shape[0])
    exact = m.elbo_closed_form(x).detach()
    assert ((est - exact).abs() < 4 * se).all(), (est - exact) / se


def test_closed_form_elbo_is_below_log_marginal(model_and_x) -> None:
    m, x = model_and_x
    assert (m.elbo_closed_form(x) < m.log_marginal(x)).all()


def test_mean_iwae_bound_is_nondecreasing_in_k(model_and_x) -> None:
    m, x = model_and_x
    torch.manual_seed(0)
    means = []
    for k in (1, 5, 50, 500):
        reps = 4000 // k if k < 500 else 40
        vals = torch.stack([bounds.iwae(m.log_weights(x, k).detach()) for _ in range(reps)])
        means.append((vals.mean(0), vals.std(0) / math.sqrt(reps)))
    for (lo, lo_se), (hi, hi_se) in zip(means, means[1:], strict=False):
        assert (hi - lo > -3 * torch.sqrt(lo_se**2 + hi_se**2)).all()
    # and the gaps are real: L_500 is clearly above the ELBO
    assert (means[-1][0] - means[0][0] > 0.1).all()
    top, top_se = means[-1]
    assert (top <= m.log_marginal(x).detach() + 4 * top_se).all()


def test_l5000_is_within_005_nats_of_log_px_for_a_reasonable_q(model_and_x) -> None:
    m, x = model_and_x
    _reasonable_q(m)
    est = log_likelihood(m, x, k=5000, batch_size=4, chunk_size=1000, seed=0)
    exact = m.log_marginal(x).detach()
    assert (est.per_point - exact).abs().max() < 0.05


def test_exact_posterior_gives_every_lk_equal_to_log_px_with_zero_variance() -> None:
    m = LinearGaussian(data_dim=5, latent_dim=2, noise_std=0.6, seed=4)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))
        m.W.copy_(q * torch.tensor([2.0, 0.5], dtype=torch.float64))
    m.set_exact_posterior()
    x = torch.randn(7, 5, dtype=torch.float64)
    exact = m.log_marginal(x).detach()
    for k in (1, 5, 50):
        lw = m.log_weights(x, k).detach()
        torch.testing.assert_close(lw, exact.expand_as(lw), rtol=0, atol=1e-10)
        torch.testing.assert_close(bounds.iwae(lw), exact, rtol=0, atol=1e-10)


def test_is_estimate_does_not_depend_on_chunking(model_and_x) -> None:
    m, x = model_and_x
    _reasonable_q(m)
    # different chunkings draw different random streams, so they agree within MC error
    a = log_likelihood(m, x, k=1000, batch_size=8, chunk_size=1000, seed=3).per_point
    b = log_likelihood(m, x, k=1000, batch_size=3, chunk_size=7, seed=3).per_point
    assert (a - b).abs().max() < 0.05
    assert a.dtype == torch.float64


def test_chunked_logsumexp_equals_one_pass_for_the_same_weights() -> None:
    """The float64 running log-sum-exp over chunks equals logsumexp of all weights at once."""
    lw = torch.randn(5000, 6, dtype=torch.float64) * 300

    class Replay:
        def __init__(self) -> None:
            self.pos = 0

        def log_weights(self, x, k):
            out = lw[self.pos : self.pos + k, : x.shape[0]]
            self.pos += k
            return out

    res = log_likelihood(Replay(), torch.zeros(6, 1), k=5000, batch_size=6, chunk_size=333)
    torch.testing.assert_close(res.per_point, bounds.iwae(lw), rtol=1e-13, atol=1e-10)


def test_is_estimate_uses_exactly_k_samples() -> None:
    calls: list[int] = []

    class Counting:
        def log_weights(self, x, k):
            calls.append(k)
            return torch.zeros(k, x.shape[0])

    res = log_likelihood(Counting(), torch.zeros(10, 2), k=1234, batch_size=10, chunk_size=500)
    assert sum(calls) == 1234
    torch.testing.assert_close(res.per_point, torch.zeros(10, dtype=torch.float64))
