"""The pythae adapter against pythae's own loss pieces and a linear-Gaussian closed form.

pythae's forward pass is run with its reparameterized draw replaced by ours, so its
reconstruction loss and KL must equal our terms at the same z. Skipped without pythae
(`pip install 'elbolab[pythae]'`; the test extra installs it, so CI runs these).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

import elbolab
from elbolab.models.linear_gaussian import LinearGaussian

pythae_models = pytest.importorskip("pythae.models")
from pythae.models.base.base_utils import ModelOutput  # noqa: E402
from pythae.models.nn import BaseDecoder, BaseEncoder  # noqa: E402

from elbolab.adapters.pythae import from_pythae  # noqa: E402

INPUT = (1, 4, 4)
D = 16
LATENT = 3


def build(kind: str, loss: str = "bce", k: int = 4):
    m = pythae_models
    common = dict(input_dim=INPUT, latent_dim=LATENT, reconstruction_loss=loss)
    if kind == "IWAE":
        return m.IWAE(m.IWAEConfig(number_samples=k, **common))
    if kind == "VAMP":
        return m.VAMP(m.VAMPConfig(number_components=5, **common))
    return m.VAE(m.VAEConfig(**common))


def data(n: int = 12, binary: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, D, generator=g)
    return (x < 0.4).float() if binary else x


def pythae_pieces(model, x: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """pythae's (recon_loss, reg_loss) on x with its draw replaced by z (``[B, d]`` or ``[B, K, d]``)."""
    model._sample_gauss = lambda mu, std: (z, None)
    out = model({"data": x.reshape(-1, *INPUT)})
    return float(out.recon_loss.detach()), float(out.reg_loss.detach())


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_vae_terms_equal_pythaes_reconstruction_and_analytic_kl(loss) -> None:
    model = build("VAE", loss)
    adapter = from_pythae(model)
    x = data(binary=loss == "bce")
    q = adapter.posterior(x)
    z = q.rsample(1)
    recon, kl = pythae_pieces(model, x, z[0])
    ours = adapter.log_likelihood(x, z).detach()
    constant = 0.5 * D * math.log(2 * math.pi) if loss == "mse" else 0.0  # pythae's mse loss drops it
    # float32: the -D/2 log 2 pi = -14.7 nats inside ours leaves ~1e-6 of rounding
    assert -float(ours.mean()) - constant == pytest.approx(recon, rel=1e-6, abs=1e-5)
    assert float(q.kl_standard().detach().mean()) == pytest.approx(kl, rel=1e-5)


def test_iwae_log_weight_terms_equal_pythaes_at_the_same_draws() -> None:
    model = build("IWAE", k=4)
    adapter = from_pythae(model)
    x = data()
    terms = adapter.log_weight_terms(x, 4)
    recon, kl = pythae_pieces(model, x, terms.z["z"].transpose(0, 1))  # pythae's draws are [B, K, d]
    assert -float(terms.log_likelihood.mean()) == pytest.approx(recon, rel=1e-6)
    assert float(terms.kl().mean()) == pytest.approx(kl, rel=1e-5, abs=1e-6)


def test_vamp_prior_is_pythaes_log_p_z_with_its_constant() -> None:
    model = build("VAMP")
    adapter = from_pythae(model)
    x = data()
    z = adapter.posterior(x).rsample(1)[0]
    theirs = model._log_p_z(z).detach()  # pythae leaves out -d/2 log 2 pi on both sides of its KL
    ours = adapter.prior.log_prob(z).detach()
    torch.testing.assert_close(ours, theirs - 0.5 * LATENT * math.log(2 * math.pi), rtol=1e-5, atol=1e-5)
    recon, kl = pythae_pieces(model, x, z)
    q = adapter.posterior(x)
    assert float((q.log_prob(z) - adapter.prior.log_prob(z)).mean()) == pytest.approx(kl, rel=1e-5, abs=1e-5)
    assert -float(adapter.log_likelihood(x, z).mean()) == pytest.approx(recon, rel=1e-6)


class LinearEncoder(BaseEncoder):
    def __init__(self, lg: LinearGaussian) -> None:
        BaseEncoder.__init__(self)
        self.A = nn.Parameter(lg.A.detach().clone())
        self.c = nn.Parameter(lg.c.detach().clone())
        self.log_var = nn.Parameter(lg.q_log_var.detach().clone())

    def forward(self, x):
        mean = x.reshape(x.shape[0], -1) @ self.A.T + self.c
        return ModelOutput(embedding=mean, log_covariance=self.log_var.expand_as(mean))


class LinearDecoder(BaseDecoder):
    def __init__(self, lg: LinearGaussian) -> None:
        BaseDecoder.__init__(self)
        self.W = nn.Parameter(lg.W.detach().clone())
        self.b = nn.Parameter(lg.b.detach().clone())

    def forward(self, z):
        return ModelOutput(reconstruction=z @ self.W.T + self.b)


def test_linear_gaussian_in_pythae_scores_the_closed_form_log_marginal() -> None:
    """pythae's "mse" VAE with linear networks is p(x|z) = N(W z + b, I): with q the exact
    posterior every log weight is log N(x; b, W W^T + I), so one sample is exact."""
    lg = LinearGaussian(data_dim=D, latent_dim=LATENT, noise_std=1.0, seed=3)
    with torch.no_grad():
        q, _ = torch.linalg.qr(lg.W)
        lg.W.copy_(q * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    lg.set_exact_posterior()
    cfg = pythae_models.VAEConfig(input_dim=(D,), latent_dim=LATENT, reconstruction_loss="mse")
    adapter = from_pythae(pythae_models.VAE(cfg, encoder=LinearEncoder(lg), decoder=LinearDecoder(lg)))
    x = torch.randn(30, D, dtype=torch.float64) + lg.b.detach()
    exact = lg.log_marginal(x).detach()
    torch.testing.assert_close(adapter.log_weights(x, 2).detach(), exact.expand(2, -1), rtol=0, atol=1e-9)
    report = elbolab.evaluate(adapter, x, k=10)
    assert report["log_likelihood"]["mean"] == pytest.approx(float(exact.mean()), abs=1e-9)


def test_diagnose_a_pythae_vamp_model(tmp_path) -> None:
    model = build("VAMP")
    adapter = from_pythae(model)
    report = elbolab.diagnose(adapter, data(60), out=tmp_path, k=20, quiet=True)
    s = report["surgery"]
    # a VampPrior has no closed-form KL: the identity is no independent check (null);
    # the MI lies in [0, log N] within its MC error
    assert s["identity_is_check"] is False and s["identity_error"] is None
    mi, se = s["mutual_information"], s["mutual_information_stderr"]
    assert -4 * se <= mi <= s["log_n"] + 4 * se
    assert report["model"] == "pythae VAMP (bce)" and report["prior"] == "vampprior (pythae)"
    assert (tmp_path / report["figures"]["prior_components"]).exists()  # its pseudo-inputs, drawn


def test_other_pythae_models_are_refused_in_one_line() -> None:
    ae = pythae_models.AE(pythae_models.AEConfig(input_dim=INPUT, latent_dim=LATENT))
    with pytest.raises(TypeError, match=r"^AE: elbolab reads pythae's VAE"):
        from_pythae(ae)


def test_missing_pythae_is_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pythae", None)
    monkeypatch.setitem(sys.modules, "pythae.models", None)
    with pytest.raises(ImportError, match=r"pip install 'elbolab\[pythae\]'"):
        from_pythae(nn.Linear(1, 1))


@pytest.mark.slow
def test_a_pythae_vamp_run_folder_resumes_bit_exact_with_the_monitor(tmp_path, monkeypatch) -> None:
    """train_model with out=: a pythae model killed mid-run continues, on the same call, to the bits
    of an uninterrupted run; metrics.jsonl carries the monitor's numbers, and the weights reload
    into a fresh pythae model."""
    import elbolab.training.loop as train_loop
    from elbolab.runs import load_run

    def vamp():
        torch.manual_seed(0)
        return build("VAMP")

    class Killed(Exception):
        """Stands in for a kill: nothing in memory reaches the next call."""

    x = data(24)
    args = dict(epochs=2, batch_size=6, k=3, progress=False, **{
        "train.monitor_every": 1, "train.monitor_points": 12, "train.checkpoint_steps": 3})
    ref = vamp()
    ref_bounds = elbolab.train_model(from_pythae(ref), x, tmp_path / "ref", **args)

    def kill_at_step_5(name: str) -> None:  # epoch 2, batch 1; the checkpoint is step 3's (epoch 1, batch 3)
        kill_at_step_5.n += name == "step"
        if kill_at_step_5.n == 5:
            raise Killed
    kill_at_step_5.n = 0
    monkeypatch.setattr(train_loop, "fault_point", kill_at_step_5)
    with pytest.raises(Killed):
        elbolab.train_model(from_pythae(vamp()), x, tmp_path / "run", **args)
    monkeypatch.setattr(train_loop, "fault_point", lambda name: None)
    model = vamp()
    assert elbolab.train_model(from_pythae(model), x, tmp_path / "run", **args) == ref_bounds
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["active_units"] <= LATENT for r in rows)
    assert len(rows[0]["kl_per_unit"]) == LATENT and rows[0]["monitor_points"] == 12
    fresh = vamp()
    load_run(tmp_path / "run", model=from_pythae(fresh))
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fresh.state_dict().values(), strict=True))
