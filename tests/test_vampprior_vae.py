"""The VampPrior paper's one-layer gated VAE (models/vampprior_vae.py) against a float64 hand
computation of its own weights: the architecture of the authors' models/VAE.py."""

from __future__ import annotations

import math

import torch

from elbolab.config import RunConfig
from elbolab.models import GatedOneLayerVAE, build_model


def _gated(x, layer):
    return (x @ layer.h.weight.double().T + layer.h.bias.double()) * torch.sigmoid(
        x @ layer.g.weight.double().T + layer.g.bias.double())


def test_gated_one_layer_is_the_authors_vae_and_its_log_weights_match_a_float64_hand_computation() -> None:
    torch.manual_seed(0)
    cfg = RunConfig().with_overrides({"model.name": "gated-one-layer", "model.hidden": [30, 20], "model.latent_dim": 4})
    model = build_model(cfg.model, 12)
    assert isinstance(model, GatedOneLayerVAE)
    assert [type(m).__name__ for m in model.encoder] == ["GatedDense", "GatedDense"]
    assert [m.h.out_features for m in model.decoder] == [20, 30]
    # He-normal weights: std sqrt(2 / fan_in) (a 784-input layer's is 0.0505)
    big = build_model(RunConfig().with_overrides({"model.name": "gated-one-layer", "model.hidden": [300, 300],
                                                  "model.latent_dim": 40}).model, 784)
    assert abs(big.encoder[0].h.weight.std().item() - math.sqrt(2 / 784)) < 0.002

    x = torch.bernoulli(torch.full((3, 12), 0.4))
    with torch.no_grad():
        terms = model.log_weight_terms(x, 2)
    z = terms.z["z"].double()  # [K, B, D]
    xd = x.double()
    h = _gated(_gated(xd, model.encoder[0]), model.encoder[1])
    w, b = model.encoder_head.linear.weight.double(), model.encoder_head.linear.bias.double()
    mean, log_var = (h @ w.T + b).split(4, dim=-1)
    log_var = log_var.clamp(-6.0, 2.0)  # the authors' hardtanh
    log_q = (-0.5 * ((z - mean) ** 2 / log_var.exp() + log_var + math.log(2 * math.pi))).sum(-1)
    log_p = (-0.5 * (z ** 2 + math.log(2 * math.pi))).sum(-1)
    d = _gated(_gated(z, model.decoder[0]), model.decoder[1])
    head = model.likelihood.head
    logits = d @ head.weight.double().T + head.bias.double()
    log_px = (xd * logits - torch.nn.functional.softplus(logits)).sum(-1)
    assert torch.allclose(terms.log_posterior["z"].double(), log_q, atol=1e-4)
    assert torch.allclose(terms.log_prior["z"].double(), log_p, atol=1e-4)
    assert torch.allclose(terms.log_likelihood.double(), log_px, atol=1e-3)


def test_gated_one_layer_clamps_the_log_variance_and_takes_a_vampprior() -> None:
    torch.manual_seed(1)
    cfg = RunConfig().with_overrides({"model.name": "gated-one-layer", "model.hidden": [16], "model.latent_dim": 3,
                                      "model.prior.name": "vampprior", "model.prior.components": 5})
    model = build_model(cfg.model, 10)
    with torch.no_grad():
        model.encoder_head.linear.bias.fill_(50.0)
        q = model.posterior(torch.ones(2, 10))
        assert q.log_var.max().item() == 2.0
        assert torch.isfinite(model.log_weights(torch.ones(2, 10), 3)).all()
