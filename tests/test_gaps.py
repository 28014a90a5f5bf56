"""The optimal local posterior q* and the gap split, against closed forms and on a trained model.

* Linear-Gaussian model: the best diagonal Gaussian for x has the posterior mean and
  variances 1 / diag(posterior precision), so the approximation gap is known exactly, and
  the amortization gap follows from the encoder's parameters (``elbo_closed_form``); the
  optimizer must reach both within 0.01 nat (checked in closed form at the parameters it
  returns), and its Monte Carlo ELBO estimates must agree within their standard errors.
* Multi-layer models: the flat-latent protocol reproduces their own log weights exactly,
  and the encoder family at its initial parameters is q_phi itself.
* A small model trained in the test: ELBO(q*) >= ELBO(q_phi) at every point and
  AIS >= IS - noise, within the stated Monte Carlo errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from _diag_models import correlated_linear_gaussian, simulated

from elbolab import bounds
from elbolab.config import ConfigError, RunConfig, preset
from elbolab.data import load
from elbolab.diagnostics.ais import AISSettings
from elbolab.diagnostics.gaps import GapSettings, gap_split
from elbolab.diagnostics.local_opt import LocalOptSettings, optimize_local
from elbolab.distributions import DiagonalGaussian
from elbolab.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_q_star_reaches_the_exact_gaps_of_the_linear_gaussian_model():
    m = correlated_linear_gaussian()
    x = simulated(m, 10)
    res = optimize_local(m, x, "encoder", LocalOptSettings(eval_samples=4000), seed=0)
    with torch.no_grad():
        log_p = m.log_marginal(x)
        elbo_best = m.elbo_closed_form(x, m.optimal_diagonal_posterior(x))
        elbo_encoder = m.elbo_closed_form(x)
        elbo_found = m.elbo_closed_form(x, DiagonalGaussian(res.params["mean"], res.params["log_var"]))
    approximation, amortization = log_p - elbo_best, elbo_best - elbo_encoder
    assert float(approximation.mean()) > 0.5 and float(amortization.mean()) > 5  # both gaps are real
    assert res.converged.all()
    assert ((log_p - elbo_found) - approximation).abs().max() < 0.01
    assert ((elbo_found - elbo_encoder) - amortization).abs().max() < 0.01
    # the reported ELBO(q*) is a Monte Carlo estimate: within 4 of its standard errors
    assert ((res.elbo - elbo_found) / res.elbo_mc_stderr).abs().max() < 4


@pytest.mark.parametrize("preset_name", ["iwae-paper-two-layer", "vampprior-paper"])
def test_flat_latent_protocol_of_multi_layer_models(preset_name):
    torch.manual_seed(0)
    model = build_model(preset(preset_name).model, 784, torch.rand(600, 784).round()).double().eval()
    x = torch.rand(3, 784).round().double()
    with torch.no_grad():
        terms = model.log_weight_terms(x, 4)
        z = model.flatten_latents(terms.z)
        log_q = sum(terms.log_posterior.values())
        assert torch.allclose(model.log_joint(x, z) - log_q, terms.log_weights(), atol=1e-9, rtol=0)
        assert torch.equal(model.split_latents(z)["z1"], terms.z["z1"])
        # the encoder family at its starting point is q_phi: same draws, same log weights
        torch.manual_seed(1)
        local = model.log_weights_local(x, 5, model.local_posterior(x))
        torch.manual_seed(1)
        assert torch.allclose(local, model.log_weights(x, 5), atol=1e-9, rtol=0)


def trained_on_embedded(cfg: RunConfig, steps: int):
    """The model ``cfg`` names after ``steps`` IWAE (k=5) steps of batch 100 on the embedded MNIST
    subset, in eval mode, and the subset's test images."""
    data = load("binarized-mnist-embedded")
    train = data.as_float("train")
    torch.manual_seed(0)
    model = build_model(cfg.model, data.data_dim, train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = train[torch.randint(0, train.shape[0], (100,))]
        loss = -bounds.iwae(model.log_weights(x, 5)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data.as_float("test")


def small_trained_model():
    """784-64-5 one-layer IWAE (k=5) after 300 steps on the embedded MNIST subset."""
    model, test = trained_on_embedded(RunConfig().with_overrides({"model.hidden": [64], "model.latent_dim": 5}), 300)
    return model, test[:12]


def test_gap_split_on_a_trained_model():
    model, x = small_trained_model()
    s = GapSettings(is_k=2000, elbo_samples=1000, local=LocalOptSettings(batch_size=12),
                    ais=AISSettings(steps=300, chains=8, leapfrog=5, batch_size=12))
    split = gap_split(model, x, s)
    # ELBO(q*) >= ELBO(q_phi) at every point, within the two estimates' Monte Carlo error
    mc = (split.elbo_amortized_mc**2 + split.local.elbo_mc_stderr**2).sqrt()
    assert (split.amortization_gap() > -3 * mc).all()
    assert float(split.amortization_gap().mean()) > 0.5
    # AIS >= IS(K) - noise: paired over points
    d = split.ais.per_point - split.is_estimate.per_point
    assert float(d.mean()) > -3 * float(d.std()) / math.sqrt(d.numel()) - 0.02
    s_ = split.summary()
    assert s_["approximation_gap"]["mean"] == pytest.approx(float(split.approximation_gap().mean()))
    total = split.approximation_gap() + split.amortization_gap()
    assert torch.allclose(total, split.inference_gap())


# --- flow posteriors: q* in the flow's own family ------------------------------------------------


def flow_config(flow: str, **more) -> RunConfig:
    return RunConfig().with_overrides({"model.hidden": [32], "model.latent_dim": 3, "model.posterior.flow": flow,
                                       "model.posterior.length": 2, **more})


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_the_flow_family_at_its_starting_point_is_q_phi(flow):
    """q* used to drop the flow (a Gaussian q* against a flow q_phi): at the encoder's outputs
    the local family must give q_phi's own log weights, draw for draw."""
    torch.manual_seed(0)
    model = build_model(flow_config(flow).model, 784, torch.rand(100, 784).round()).double().eval()
    x = torch.rand(4, 784).round().double()
    with torch.no_grad():
        params = model.local_posterior(x)
        assert "flow" in params and params["flow"].shape[0] == 4
        torch.manual_seed(1)
        local = model.log_weights_local(x, 6, params)
        torch.manual_seed(1)
        assert torch.allclose(local, model.log_weights(x, 6), atol=1e-10, rtol=0)


def test_gap_split_on_a_trained_planar_model_stays_in_one_family():
    """ELBO(q*) >= ELBO(q_phi) up to Monte Carlo error at every point: the amortization gap was
    -0.69 nats when q* was a Gaussian and q_phi the planar flow."""
    model, test = trained_on_embedded(flow_config("planar", **{"model.hidden": [64], "model.latent_dim": 5}), 200)
    x = test[:8]
    s = GapSettings(is_k=500, elbo_samples=1000, local=LocalOptSettings(batch_size=8, max_steps=400), ais=None)
    split = gap_split(model, x, s)
    assert set(split.local.params) == {"mean", "log_var", "flow"}
    mc = (split.elbo_amortized_mc**2 + split.local.elbo_mc_stderr**2).sqrt()
    assert (split.amortization_gap() > -3 * mc).all(), split.amortization_gap()
    assert float(split.amortization_gap().mean()) > 0
    with pytest.raises(ConfigError, match="q\\* family 'gaussian': this model's posterior is a planar flow"):
        gap_split(model, x, GapSettings(family="gaussian", ais=None))


def test_a_multi_layer_flow_model_refuses_q_star_in_one_line():
    from elbolab.errors import ModelCapabilityError

    cfg = preset("iwae-paper-two-layer").with_overrides({"model.posterior.flow": "planar", "model.posterior.length": 1})
    torch.manual_seed(0)
    model = build_model(cfg.model, 784, torch.rand(50, 784).round()).eval()
    with pytest.raises(ModelCapabilityError, match="planar flow posterior: q\\* in the flow's family"):
        gap_split(model, torch.rand(2, 784).round(), GapSettings(ais=None))
