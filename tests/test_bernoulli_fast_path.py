"""The no-gradient Bernoulli fast path (``log_prob_linear``) against the general form.

The fast path rewrites ``sum_d x_d logits_d`` through the decoder's last Linear layer and
overwrites its own logits with their softplus; it must give the general form's value
up to float32 rounding, measured against a float64 reference on the same draws.
"""

from __future__ import annotations

import pytest
import torch

from elbolab.config import ModelConfig
from elbolab.diagnostics.likelihood import log_likelihood
from elbolab.distributions import log_bernoulli_linear_, log_bernoulli_logits
from elbolab.likelihoods import BernoulliLikelihood, GaussianLikelihood
from elbolab.models import build_model


def _general(self, x, features, layer):
    return self.log_prob(x, layer(features))


def _layer_and_features(k: int = 30, b: int = 7, h: int = 20, d: int = 40, scale: float = 3.0):
    """Logits spanning about -60..60, past softplus's threshold of 20 on both sides."""
    layer = torch.nn.Linear(h, d)
    with torch.no_grad():
        layer.weight.mul_(scale * 4)
        layer.bias.uniform_(-5, 5)
    features = torch.randn(k, b, h).tanh() * scale
    return layer, features


@pytest.mark.parametrize("grey", [False, True])
def test_fast_path_matches_float64_reference(grey: bool) -> None:
    layer, features = _layer_and_features()
    x = torch.rand(7, 40) if grey else torch.bernoulli(torch.full((7, 40), 0.3))
    with torch.no_grad():
        logits = layer(features)
        assert logits.abs().max() > 20 and logits.min() < -20  # both softplus branches taken
        general = log_bernoulli_logits(x, logits)
        fast = log_bernoulli_linear_(x, features, layer.weight, layer.bias)
        ref = log_bernoulli_logits(
            x.double(), torch.nn.functional.linear(features.double(), layer.weight.double(), layer.bias.double())
        )
    assert fast.shape == ref.shape == (30, 7)
    # float32 rounding of a sum of 40 terms of size ~60: both forms are within a few ulps of the total
    tol = 64 * torch.finfo(torch.float32).eps * ref.abs().clamp_min(1.0)
    assert ((general.double() - ref).abs() <= tol).all()
    assert ((fast.double() - ref).abs() <= tol).all()


def test_fast_path_refuses_gradients_and_likelihood_falls_back() -> None:
    layer, features = _layer_and_features()
    x = torch.bernoulli(torch.full((7, 40), 0.5))
    with pytest.raises(ValueError, match="no gradient"):
        log_bernoulli_linear_(x, features, layer.weight, layer.bias)
    # with gradients on, the likelihood takes the general path and its gradient is the general one
    lik = BernoulliLikelihood()
    got = lik.log_prob_linear(x, features, layer).sum()
    (g_got,) = torch.autograd.grad(got, layer.weight)
    want = log_bernoulli_logits(x, layer(features)).sum()
    (g_want,) = torch.autograd.grad(want, layer.weight)
    assert torch.equal(g_got, g_want)


def test_other_likelihoods_apply_the_layer() -> None:
    layer = torch.nn.Linear(5, 8)
    features = torch.randn(3, 2, 5)
    x = torch.rand(2, 4)
    lik = GaussianLikelihood()
    with torch.no_grad():
        assert torch.equal(lik.log_prob_linear(x, features, layer), lik.log_prob(x, layer(features)))


@pytest.mark.parametrize("name", ["one-layer", "two-layer", "hierarchical"])
def test_models_log_weights_equal_general_path_on_same_draws(name: str, monkeypatch, one_thread) -> None:
    cfg = ModelConfig(name=name, latent_dim=6, hidden=(16, 16))
    data = torch.bernoulli(torch.full((64, 784), 0.2))
    model = build_model(cfg, 784, data).eval()
    x = data[:5]
    with torch.inference_mode():
        torch.manual_seed(1)
        fast = model.log_weights(x, 40)
        monkeypatch.setattr(BernoulliLikelihood, "log_prob_linear", _general)
        torch.manual_seed(1)
        general = model.log_weights(x, 40)
    assert fast.shape == (40, 5)
    assert torch.allclose(fast, general, rtol=2e-6, atol=1e-4)
    assert not torch.equal(fast, general[torch.randperm(40)])  # the comparison can tell draws apart


def test_is_log_likelihood_unchanged_by_fast_path(monkeypatch, one_thread) -> None:
    """The whole estimator: same seed, same draws, estimates equal to float32 rounding."""
    data = torch.bernoulli(torch.full((64, 784), 0.2))
    model = build_model(ModelConfig(latent_dim=8, hidden=(32, 32)), 784, data)
    fast = log_likelihood(model, data[:6], k=300, batch_size=4, chunk_size=70, seed=3).per_point
    monkeypatch.setattr(BernoulliLikelihood, "log_prob_linear", _general)
    general = log_likelihood(model, data[:6], k=300, batch_size=4, chunk_size=70, seed=3).per_point
    assert (fast - general).abs().max() < 1e-6 * general.abs().max()
