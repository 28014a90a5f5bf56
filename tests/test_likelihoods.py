"""Grey-level likelihoods: the discretized logistic is a pmf over 256 levels, stable in its
tails; the Gaussians equal torch's densities; every likelihood plugs into every model."""

from __future__ import annotations

import math

import pytest
import torch

from elbolab.distributions import log_discretized_logistic
from elbolab.likelihoods import (
    GAUSSIAN_MIN_LOG_VAR,
    DiscretizedLogisticLikelihood,
    GaussianLikelihood,
    GaussianPixelVarianceLikelihood,
    make_likelihood,
)

LEVELS = torch.arange(256, dtype=torch.float64) / 255


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_discretized_logistic_sums_to_one_over_256_levels(dtype, tol):
    locs = torch.tensor([-0.3, 0.0, 1 / 512, 0.25, 0.5, 0.77, 1.0, 1.4], dtype=dtype)
    log_scales = torch.tensor([-9.0, -4.5, -2.0, 0.0, 2.0], dtype=dtype)
    loc, ls = torch.meshgrid(locs, log_scales, indexing="ij")
    loc, ls = loc.reshape(1, -1, 1), ls.reshape(1, -1, 1)  # [1, M, 1] against 256 levels
    x = LEVELS.to(dtype).reshape(-1, 1, 1)  # [256, 1, 1]
    log_p = log_discretized_logistic(x, loc, ls)  # [256, M]
    total = torch.logsumexp(log_p.double(), dim=0)
    assert total.abs().max() < tol, total


def test_discretized_logistic_equals_cdf_differences_and_edge_bins():
    loc, log_s = torch.tensor(0.4, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)
    s = math.exp(-2.5)
    got = torch.exp(log_discretized_logistic(LEVELS[:, None], loc, log_s))
    edges = (torch.arange(257, dtype=torch.float64) - 0.5) / 255
    cdf = torch.sigmoid((edges - loc) / s)
    cdf[0], cdf[-1] = 0.0, 1.0  # the edge bins take the tails
    torch.testing.assert_close(got, cdf[1:] - cdf[:-1], rtol=1e-10, atol=1e-15)


def test_discretized_logistic_tails_are_exact_where_cdf_differences_underflow():
    # level 128 under loc 0, s = e^-4.5: both CDFs round to 1 in float32, the bin mass is ~e^-44
    x = torch.tensor([128 / 255])
    got = log_discretized_logistic(x, torch.tensor(0.0), torch.tensor(-4.5))
    s = math.exp(-4.5)
    a, b = (127.5 / 255) / s, (128.5 / 255) / s
    # float64 reference in the survival-function form: sigma(-a) - sigma(-b)
    want = math.log(math.exp(-a) / (1 + math.exp(-a)) - math.exp(-b) / (1 + math.exp(-b)))
    assert abs(float(got) - want) < 1e-4 * abs(want)
    loc = torch.tensor(0.0, requires_grad=True)
    log_discretized_logistic(x, loc, torch.tensor(-4.5)).backward()
    assert torch.isfinite(loc.grad)


def test_discretized_logistic_likelihood_reads_vampprior_parameterization():
    lik = DiscretizedLogisticLikelihood(5)
    x = torch.rand(3, 5)
    params = torch.randn(4, 3, 10) * 3
    loc = torch.sigmoid(params[..., :5]).clamp(1 / 512, 1 - 1 / 512)
    log_s = params[..., 5:].clamp(-4.5, 0.0)
    torch.testing.assert_close(lik.log_prob(x, params), log_discretized_logistic(x, loc, log_s))
    torch.testing.assert_close(lik.mean(params), loc)


def test_gaussian_likelihoods_equal_torch_normal_and_respect_the_floor():
    x = torch.rand(3, 5, dtype=torch.float64)
    params = torch.randn(2, 3, 10, dtype=torch.float64)
    lik = GaussianLikelihood(5)
    mean, raw = params[..., :5], params[..., 5:]
    log_var = GAUSSIAN_MIN_LOG_VAR + torch.nn.functional.softplus(raw - GAUSSIAN_MIN_LOG_VAR)
    want = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.log_prob(x, params), want)
    # a decoder asking for variance 0 gets the floor, so the density stays bounded
    collapsed = torch.cat([x, torch.full_like(x, -1e4)], -1)
    bound = -0.5 * 5 * (math.log(2 * math.pi) + GAUSSIAN_MIN_LOG_VAR)
    assert float(lik.log_prob(x, collapsed).max()) <= bound + 1e-9

    pix = GaussianPixelVarianceLikelihood(5).double()
    with torch.no_grad():
        pix.raw_log_var.copy_(torch.linspace(-3, 1, 5))
    lv = GAUSSIAN_MIN_LOG_VAR + torch.nn.functional.softplus(pix.raw_log_var - GAUSSIAN_MIN_LOG_VAR)
    want = torch.distributions.Normal(mean, torch.exp(0.5 * lv)).log_prob(x).sum(-1)
    torch.testing.assert_close(pix.log_prob(x, mean), want)


@pytest.mark.parametrize("name", ["bernoulli", "discretized-logistic", "gaussian", "gaussian-pixel-var"])
def test_output_bias_starts_at_the_mean_image(name):
    lik = make_likelihood(name, 5, in_features=3)
    pixel_mean = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    lik.init_output_bias(pixel_mean)
    with torch.no_grad():
        torch.testing.assert_close(lik.mean(lik.head(torch.zeros(3))), pixel_mean, rtol=0, atol=1e-5)


def test_unknown_likelihood_names_the_key():
    with pytest.raises(ValueError, match=r"model\.likelihood: unknown likelihood 'logistic'"):
        make_likelihood("logistic", 5)
