"""The Pyro adapter against Pyro's own densities and the linear-Gaussian closed forms.

The model: p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I), q(z|x) = N(A x + c, diag v), written
in Pyro with the parameters of an elbolab LinearGaussian (so log p(x) = log N(x; b, W W^T +
s^2 I) is known, and the native model is an independent twin). Skipped without pyro-ppl
(`pip install 'elbolab[pyro]'`; the test extra installs it, so CI runs these).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import elbolab
from elbolab.config import ObjectiveConfig
from elbolab.models.linear_gaussian import LinearGaussian
from elbolab.objectives import make_objective

pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402

from elbolab.adapters.pyro import from_pyro  # noqa: E402


class Decoder(nn.Module):
    def __init__(self, lg: LinearGaussian) -> None:
        super().__init__()
        self.W = nn.Parameter(lg.W.detach().clone())
        self.b = nn.Parameter(lg.b.detach().clone())
        self.log_noise_var = nn.Parameter(lg.log_noise_var.detach().clone())


class Encoder(nn.Module):
    def __init__(self, lg: LinearGaussian) -> None:
        super().__init__()
        self.A = nn.Parameter(lg.A.detach().clone())
        self.c = nn.Parameter(lg.c.detach().clone())
        self.q_log_var = nn.Parameter(lg.q_log_var.detach().clone())


def pyro_twin(lg: LinearGaussian):
    """The Pyro model + guide of ``lg``, wrapped; returns (adapter, model, guide)."""
    enc, dec = Encoder(lg), Decoder(lg)
    d = lg.latent_dims[0]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], d, dtype=x.dtype), 1.0).to_event(1))
            noise = torch.exp(0.5 * dec.log_noise_var)
            pyro.sample("x", dist.Normal(z @ dec.W.T + dec.b, noise).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = x @ enc.A.T + enc.c
            pyro.sample("z", dist.Normal(loc, torch.exp(0.5 * enc.q_log_var).expand_as(loc)).to_event(1))

    return from_pyro(model, guide, encoder=enc, decoder=dec, name="linear-Gaussian (pyro)"), model, guide


@pytest.fixture
def lg_and_x() -> tuple[LinearGaussian, torch.Tensor]:
    lg = LinearGaussian(data_dim=6, latent_dim=3, noise_std=0.8, seed=2)
    g = torch.Generator().manual_seed(5)
    return lg, torch.randn(40, 6, generator=g, dtype=torch.float64) * 1.5 + lg.b.detach()


def _reasonable_q(lg: LinearGaussian) -> None:
    """q: the exact posterior's mean map and the diagonal of its covariance (close, not exact)."""
    s2 = torch.exp(lg.log_noise_var)
    cov = torch.linalg.inv(torch.eye(3, dtype=torch.float64) + lg.W.T @ lg.W / s2)
    with torch.no_grad():
        lg.A.copy_(cov @ lg.W.T / s2)
        lg.c.copy_(-(cov @ lg.W.T @ lg.b) / s2)
        lg.q_log_var.copy_(torch.log(torch.diagonal(cov)))


def test_log_weights_are_pyros_own_trace_densities(lg_and_x) -> None:
    lg, x = lg_and_x
    adapter, model, guide = pyro_twin(lg)
    terms = adapter.log_weight_terms(x, 4)
    log_w = terms.log_weights().detach()
    for j in range(4):  # each particle: Pyro's traces with z conditioned on our draw
        z = terms.z["z"][j].detach()
        g = poutine.trace(poutine.condition(guide, data={"z": z})).get_trace(x)
        m = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x)
        total = (m.log_prob_sum() - g.log_prob_sum()).detach()
        assert float(total) == pytest.approx(float(log_w[j].sum()), abs=1e-9)
        g.compute_log_prob()
        m.compute_log_prob()
        per_point = m.nodes["x"]["log_prob"] + m.nodes["z"]["log_prob"] - g.nodes["z"]["log_prob"]
        torch.testing.assert_close(log_w[j], per_point.detach(), rtol=0, atol=1e-10)


def test_log_weights_equal_the_native_linear_gaussian(lg_and_x) -> None:
    lg, x = lg_and_x
    adapter, _, _ = pyro_twin(lg)
    adapter.log_weights(x[:2], 1)  # the first call traces once to read the sites (draws)
    torch.manual_seed(3)
    ours = adapter.log_weight_terms(x, 5)
    torch.manual_seed(3)
    native = lg.log_weight_terms(x, 5)
    torch.testing.assert_close(ours.log_weights(), native.log_weights(), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.log_likelihood, native.log_likelihood, rtol=0, atol=1e-10)


def test_exact_posterior_gives_log_p_x_with_one_sample(lg_and_x) -> None:
    """With q = p(z|x) every log weight equals log p(x): L_1 is exact, a closed-form check."""
    lg, x = lg_and_x
    with torch.no_grad():  # orthogonal columns make the exact posterior diagonal
        q, _ = torch.linalg.qr(lg.W)
        lg.W.copy_(q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    lg.set_exact_posterior()
    adapter, _, _ = pyro_twin(lg)
    log_w = adapter.log_weights(x, 3).detach()
    exact = lg.log_marginal(x).detach()
    torch.testing.assert_close(log_w, exact.expand(3, -1), rtol=0, atol=1e-9)


def test_is_estimate_matches_the_closed_form_log_marginal(lg_and_x) -> None:
    lg, x = lg_and_x
    _reasonable_q(lg)
    adapter, _, _ = pyro_twin(lg)
    report = elbolab.evaluate(adapter, x, k=500, bound_k=5)
    exact = lg.log_marginal(x).detach()
    # the per-point IS estimates from the same seeded draws, for a paired standard error
    est = elbolab.diagnostics.log_likelihood(adapter, x, k=500, seed=1).per_point
    diff = est - exact
    se = float(diff.std() / math.sqrt(diff.numel()))
    assert report["log_likelihood"]["mean"] == pytest.approx(float(est.mean()), abs=1e-9)
    assert abs(float(diff.mean())) < 4 * se + 1e-3, (float(diff.mean()), se)
    # a dropped Gaussian constant (-D/2 log 2 pi = -5.5 nats) would be caught many times over
    assert se < 0.05


def test_dreg_stl_and_standard_gradients_equal_the_native_models(lg_and_x) -> None:
    lg, x = lg_and_x
    adapter, _, _ = pyro_twin(lg)
    adapter.log_weights(x[:2], 1)
    for estimator in ("standard", "stl", "dreg"):
        objective = make_objective(ObjectiveConfig(name="iwae", k=6, estimator=estimator))
        torch.manual_seed(11)
        ours = torch.autograd.grad(objective(adapter, x).loss, [adapter.encoder.A, adapter.encoder.q_log_var,
                                                               adapter.decoder.W])
        torch.manual_seed(11)
        native = torch.autograd.grad(objective(lg, x).loss, [lg.A, lg.q_log_var, lg.W])
        for a, b in zip(ours, native, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert [n.split(".")[0] for n, _ in adapter.named_parameters()] == ["encoder"] * 3 + ["decoder"] * 3


def test_train_model_with_dreg_follows_the_native_model_step_for_step(lg_and_x) -> None:
    lg, x = lg_and_x
    twin = LinearGaussian(data_dim=6, latent_dim=3, noise_std=0.8, seed=2)
    adapter, _, _ = pyro_twin(lg)
    adapter.log_weights(x[:2], 1)
    torch.manual_seed(4)
    ours = elbolab.train_model(adapter, x, epochs=3, batch_size=10, lr=1e-2, k=4, estimator="dreg")
    torch.manual_seed(4)
    native = elbolab.train_model(twin, x, epochs=3, batch_size=10, lr=1e-2, k=4, estimator="dreg")
    assert ours == pytest.approx(native, abs=1e-8)
    torch.testing.assert_close(adapter.encoder.A, twin.A, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(adapter.decoder.W, twin.W, rtol=1e-7, atol=1e-9)
    assert not torch.equal(twin.A, lg.A)  # it did train


def test_diagnose_reads_the_guide_and_the_prior(lg_and_x, tmp_path) -> None:
    lg, x = lg_and_x
    _reasonable_q(lg)
    adapter, _, _ = pyro_twin(lg)
    q = adapter.posterior(x)
    torch.testing.assert_close(q.mean, (x @ lg.A.T + lg.c).detach())
    z = torch.randn(2, 40, 3, dtype=torch.float64)
    torch.testing.assert_close(adapter.prior.log_prob(z), lg.prior.log_prob(z))
    report = elbolab.diagnose(adapter, x, out=tmp_path, k=50, quiet=True)
    s = report["surgery"]
    # Pyro's prior has no closed-form KL here, so the average KL is Monte Carlo from the same
    # draws and the identity is no independent check (reported as null)
    assert s["identity_is_check"] is False and s["identity_error"] is None
    assert report["model"] == "linear-Gaussian (pyro)" and report["active_units"]["counts"] == [3]
    assert (tmp_path / "diagnostics.md").exists() and (tmp_path / "diag-samples.png").exists()


def test_a_site_outside_the_data_plate_is_named() -> None:
    def model(x):  # a global latent: log p(x) does not factorize over data points
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    adapter = from_pyro(model, guide)
    with pytest.raises(ValueError, match=r"site 'w' is outside the plate 'data'"):
        adapter.log_weights(torch.zeros(3), 2)


def test_a_global_latent_with_two_dim_data_is_refused_up_front_not_a_pyro_runtime_error() -> None:
    """[B, D] data and a scalar global latent died in Pyro's RuntimeError (particle-plate shapes)."""
    from elbolab.adapters.pyro import PyroModelError

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0).expand([x.shape[0], x.shape[1]]).to_event(1), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(PyroModelError, match=r"guide site 'w' is outside the plate 'data'.*global latent"):
        from_pyro(model, guide).log_weights(torch.zeros(3, 4), 2)


def test_a_data_site_without_obs_is_refused_not_scored_as_a_latent(lg_and_x) -> None:
    """Without obs=x the data site was sampled from the model and its density counted as a
    prior term: log p(x) -440 instead of -557, silently."""
    from elbolab.adapters.pyro import PyroModelError

    lg, x = lg_and_x
    enc, dec = Encoder(lg), Decoder(lg)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 3, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ dec.W.T + dec.b, torch.exp(0.5 * dec.log_noise_var)).to_event(1))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = x @ enc.A.T + enc.c
            pyro.sample("z", dist.Normal(loc, torch.exp(0.5 * enc.q_log_var).expand_as(loc)).to_event(1))

    with pytest.raises(PyroModelError, match=r"model site\(s\) 'x' neither observed nor in the guide.*obs="):
        elbolab.evaluate(from_pyro(model, guide, encoder=enc, decoder=dec), x, k=10)


def test_missing_pyro_is_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyro", None)
    with pytest.raises(ImportError, match=r"pip install 'elbolab\[pyro\]'"):
        from_pyro(lambda x: None, lambda x: None)


def test_a_student_t_guide_still_gives_the_closed_form_log_p_x(lg_and_x) -> None:
    """IS needs only log q: a non-Gaussian guide is scored; active units (which need a Gaussian) are skipped."""
    lg, x = lg_and_x
    _reasonable_q(lg)
    adapter, model, _ = pyro_twin(lg)
    enc = adapter.encoder

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = x @ enc.A.T + enc.c
            scale = torch.exp(0.5 * enc.q_log_var).expand_as(loc)
            pyro.sample("z", dist.StudentT(5.0, loc, scale).to_event(1))

    heavy = from_pyro(model, guide, encoder=enc, decoder=adapter.decoder)
    report = elbolab.evaluate(heavy, x, k=500, bound_k=5)
    assert "StudentT" in report["active_units"]["skipped"] and report["active_units"]["label"].startswith("n/a")
    est = elbolab.diagnostics.log_likelihood(heavy, x, k=500, seed=1).per_point
    diff = est - lg.log_marginal(x).detach()
    se = float(diff.std() / math.sqrt(diff.numel()))
    assert abs(float(diff.mean())) < 4 * se + 1e-3 and se < 0.05, (float(diff.mean()), se)
