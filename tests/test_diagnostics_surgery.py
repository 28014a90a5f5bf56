"""ELBO surgery: exact limits, a 1-D case by quadrature, and the linear-Gaussian ELBO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _diag_models import data_from
from scipy import integrate, stats

from elbolab.diagnostics.surgery import (
    ANALYTIC_KL,
    SurgeryError,
    aggregate_log_density,
    elbo_surgery,
    mutual_information_terms,
)
from elbolab.distributions import log_normal_diag
from elbolab.models.linear_gaussian import LinearGaussian
from elbolab.models.one_layer import OneLayerVAE
from elbolab.priors import MixtureOfGaussians, StandardNormal


def test_aggregate_log_density_matches_the_broadcast_formula_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(37, 4, generator=g, dtype=torch.float64) * 3
    log_var = torch.randn(37, 4, generator=g, dtype=torch.float64) - 2
    z = torch.randn(23, 4, generator=g, dtype=torch.float64) * 3
    ref = torch.logsumexp(log_normal_diag(z[:, None], mean, log_var), 1) - math.log(37)
    for max_elements in (1, 100, 1 << 24):
        assert torch.allclose(aggregate_log_density(z, mean, log_var, max_elements), ref, rtol=0, atol=1e-10)


def test_identical_posteriors_carry_no_information():
    n, s = 50, 7
    mean = torch.full((n, 3), 0.4, dtype=torch.float64)
    log_var = torch.full((n, 3), -0.5, dtype=torch.float64)
    z = mean + torch.exp(0.5 * log_var) * torch.randn(s, n, 3, dtype=torch.float64)
    cond, agg = mutual_information_terms(z, mean, log_var)
    assert torch.allclose(cond - agg, torch.zeros(s, n, dtype=torch.float64), atol=1e-10)


def test_separated_posteriors_reach_log_n():
    n, s = 64, 5
    mean = 40.0 * torch.arange(n, dtype=torch.float64)[:, None].expand(n, 2)  # 40 sd apart
    log_var = torch.zeros(n, 2, dtype=torch.float64)
    z = mean + torch.randn(s, n, 2, dtype=torch.float64)
    cond, agg = mutual_information_terms(z, mean, log_var)
    assert float((cond - agg).mean()) == pytest.approx(math.log(n), abs=1e-9)


def _one_d_model() -> tuple[LinearGaussian, torch.Tensor]:
    """1-D x and z: q(z|x) = N(0.9 x - 0.2, 0.3^2) for x = -2, 0.5, 3."""
    m = LinearGaussian(1, 1, noise_std=0.5)
    with torch.no_grad():
        m.A.fill_(0.9)
        m.c.fill_(-0.2)
        m.q_log_var.fill_(2 * math.log(0.3))
    return m, torch.tensor([[-2.0], [0.5], [3.0]], dtype=torch.float64)


def test_surgery_matches_quadrature_in_one_dimension():
    model, x = _one_d_model()
    means, sd = (0.9 * x[:, 0] - 0.2).numpy(), 0.3

    def q_agg(z):
        return np.mean([stats.norm.pdf(z, m, sd) for m in means], axis=0)

    lim = (-12, 12)
    mi_exact = np.mean([
        integrate.quad(lambda z, m=m: stats.norm.pdf(z, m, sd) * (stats.norm.logpdf(z, m, sd) - np.log(q_agg(z))),
                       *lim, points=list(means), limit=200)[0]
        for m in means
    ])
    mkl_exact = integrate.quad(lambda z: q_agg(z) * (np.log(q_agg(z)) - stats.norm.logpdf(z)), *lim,
                               points=list(means), limit=200)[0]
    s = elbo_surgery(model, x, samples=20000, batch_size=2, seed=3)
    # the identity holds exactly in the quadrature values
    assert s.average_kl == pytest.approx(mi_exact + mkl_exact, abs=1e-7)
    assert s.average_kl_analytic
    assert abs(s.mutual_information - mi_exact) < 4 * s.mutual_information_stderr
    assert abs(s.marginal_kl - mkl_exact) < 4 * s.marginal_kl_stderr
    assert 0 < s.mutual_information < s.log_n == pytest.approx(math.log(3))
    assert abs(s.identity_error) < 4 * s.identity_stderr
    with torch.no_grad():
        elbo = float(model.elbo_closed_form(x).mean())
    assert abs(s.elbo - elbo) < 4 * s.reconstruction_stderr


class _NoClosedForm(StandardNormal):
    @property
    def has_analytic_kl(self) -> bool:
        return False


def test_surgery_uses_monte_carlo_kl_when_the_prior_has_no_closed_form():
    model = LinearGaussian(4, 2, noise_std=0.8, seed=1)
    x = data_from(model, 200, seed=2)
    exact = elbo_surgery(model, x, samples=20, seed=1)
    model.prior = _NoClosedForm(2).to(torch.float64)
    mc = elbo_surgery(model, x, samples=20, seed=1)
    assert exact.average_kl_analytic and not mc.average_kl_analytic
    assert abs(mc.average_kl - exact.average_kl) < 4 * mc.average_kl_stderr
    # with the KL from the same draws, MI + marginal KL reproduces it to rounding: no check
    assert mc.identity_error == pytest.approx(0.0, abs=1e-9)
    assert exact.identity_is_check and not mc.identity_is_check
    assert mc.mutual_information == pytest.approx(exact.mutual_information, abs=1e-12)


def test_with_a_mixture_prior_the_identity_is_reported_as_no_check():
    torch.manual_seed(0)
    model = OneLayerVAE(6, 2, [8], "tanh", "bernoulli", MixtureOfGaussians(2, 3))
    x = (torch.rand(40, 6, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    s = elbo_surgery(model, x, samples=5, seed=0)
    assert not s.average_kl_analytic and not s.identity_is_check
    assert s.mutual_information > 0.01 and s.marginal_kl > 0.01
    # zero by construction (float32 terms against float64 ones), whatever the estimator's error
    assert s.identity_error == pytest.approx(0.0, abs=1e-5)
    d = s.to_dict()
    assert d["identity_is_check"] is False and d["identity_error"] is None and d["identity_stderr"] is None
    table = s.table()
    assert "no check, 0 by construction" in table and "check: average KL" not in table


class _WrongKL(StandardNormal):
    """A standard normal prior whose registered closed-form KL is 0.5 nats too high."""


def test_with_an_analytic_kl_the_identity_is_an_independent_check(monkeypatch):
    model = LinearGaussian(4, 2, noise_std=0.8, seed=1)
    x = data_from(model, 200, seed=2)
    right = elbo_surgery(model, x, samples=20, seed=1)
    assert right.identity_is_check and right.to_dict()["identity_is_check"] is True
    assert abs(right.identity_error) < 4 * right.identity_stderr
    assert "check: average KL − (MI + marginal KL)" in right.table()
    # the same draws with a wrong closed form: the check sees the 0.5 nats
    monkeypatch.setitem(ANALYTIC_KL, _WrongKL, lambda prior, q: q.kl_standard() + 0.5)
    model.prior = _WrongKL(2).to(torch.float64)
    wrong = elbo_surgery(model, x, samples=20, seed=1)
    assert wrong.identity_is_check
    assert wrong.identity_error == pytest.approx(right.identity_error + 0.5, abs=1e-9)
    assert abs(wrong.identity_error) > 4 * wrong.identity_stderr


def test_surgery_refuses_models_with_several_stochastic_layers():
    model = LinearGaussian(4, 2)
    model.latent_dims = [2, 3]
    with pytest.raises(SurgeryError, match="one stochastic layer"):
        elbo_surgery(model, torch.zeros(3, 4))
