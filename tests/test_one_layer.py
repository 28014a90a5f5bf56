"""The one-layer model's log weights equal the sum of its parts, computed independently."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from elbolab.config import ModelConfig
from elbolab.distributions import log_bernoulli_logits
from elbolab.models import OneLayerVAE, build_model


def test_architecture_is_the_iwae_papers() -> None:
    m = build_model(ModelConfig(), 784)
    assert isinstance(m, OneLayerVAE)
    shapes = [tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")]
    assert shapes == [(200, 784), (200, 200), (100, 200), (200, 50), (200, 200), (784, 200)]
    assert all(isinstance(a, torch.nn.Tanh) for a in (m.encoder[1], m.encoder[3], m.decoder[1], m.decoder[3]))


def test_log_weights_equal_hand_assembled_densities() -> None:
    torch.manual_seed(0)
    m = build_model(ModelConfig(latent_dim=3, hidden=(7,)), 10).double()
    x = torch.bernoulli(torch.full((4, 10), 0.3, dtype=torch.float64))
    torch.manual_seed(1)
    terms = m.log_weight_terms(x, 6)
    z = terms.z["z"]
    mean, log_var = m.encoder_head(m.encoder(x))
    std = torch.exp(0.5 * log_var)
    log_q = torch.distributions.Normal(mean, std).log_prob(z).sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    probs = torch.sigmoid(m.decode(z))
    log_px = torch.distributions.Bernoulli(probs=probs).log_prob(x.expand_as(probs)).sum(-1)
    torch.testing.assert_close(terms.log_weights(), log_px + log_pz - log_q)
    # the samples are reparameterized draws from q: z = mean + std * eps with eps ~ N(0, 1)
    torch.manual_seed(1)
    eps = torch.randn(6, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(z, mean + std * eps)


def test_bernoulli_log_prob_is_exact_for_extreme_logits() -> None:
    logits = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]], dtype=torch.float64)
    for xv in (0.0, 1.0):
        x = torch.full_like(logits, xv)
        ref = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        got = log_bernoulli_logits(x, logits)
        torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)
        assert torch.isfinite(got).all()
    # log sigmoid(-200) = -200 exactly (to rounding), which log(sigmoid(.)) in float32 cannot give
    assert log_bernoulli_logits(torch.ones(1, 1), torch.tensor([[-200.0]])).item() == -200.0


def test_output_bias_starts_at_the_data_mean_image() -> None:
    data = torch.bernoulli(torch.rand(500, 20).clamp(0.05, 0.95))
    m = build_model(ModelConfig(latent_dim=2, hidden=(5,)), 20, train_data=data)
    p = data.mean(0).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(torch.sigmoid(m.likelihood.head.bias.detach()), p, rtol=1e-5, atol=1e-6)


def test_log_weight_terms_average_to_the_closed_form_kl() -> None:
    """E_q[log q(z|x) - log p(z)] over many draws equals KL(q || N(0, I)) in closed form:
    a wrong constant or sign in either log-density moves the average by far more than its
    standard error (one nat of error is hundreds of standard errors here)."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(latent_dim=3, hidden=(8,)), 12).double()
    x = torch.bernoulli(torch.full((4, 12), 0.5, dtype=torch.float64))
    with torch.no_grad():
        terms = m.log_weight_terms(x, 20_000)
        kl_draws = terms.kl()  # [K, B]
        closed = m.posterior(x).kl_standard()  # [B]
    se = kl_draws.std(0) / math.sqrt(kl_draws.shape[0])
    assert ((kl_draws.mean(0) - closed).abs() < 5 * se).all()
    assert (se < 0.02).all()
