"""AVB with adaptive contrast (models.avb): adversary, moments, AIS, training, resume, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainhelp import fit, register_tiny_embedded

from elbolab.cli import main
from elbolab.config import ConfigError, RunConfig
from elbolab.data import ImageDataset, load
from elbolab.diagnostics.ais import implicit_log_likelihood
from elbolab.diagnostics.surgery import SurgeryError, elbo_surgery
from elbolab.distributions import log_normal_diag, log_standard_normal
from elbolab.errors import ModelCapabilityError
from elbolab.evaluation import log_likelihood
from elbolab.models import build_model
from elbolab.models.avb import VAR_FLOOR, Adversary, AVBModel
from elbolab.reproduce import reproduce
from elbolab.training import RunState
from elbolab.training.packing import pack
from elbolab.training.step import AdversarialStep, make_step

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model.name": "avb", "model.latent_dim": 2, "model.hidden": [32], "model.avb.eps_dim": 4,
        "model.avb.eps_nbasis": 3, "model.avb.noise_hidden": [16], "model.avb.adversary_x_hidden": [32],
        "model.avb.adversary_z_hidden": [32], "model.avb.adversary_features": 16,
        "objective.name": "vae", "objective.k": 1}


def tiny_model(**more) -> AVBModel:
    cfg = RunConfig().with_overrides({**TINY, **more})
    torch.manual_seed(0)
    return build_model(cfg.model, 784)


def test_adversary_recovers_log_q_minus_log_p_of_a_known_gaussian_posterior():
    """q(z|x) = N(mu(x), 0.6^2 I) for four inputs x, p(z) = N(0, I): the logistic loss's optimum is
    T = log q(z|x) - log p(z). After 400 Adam steps the RMS error under q is below 0.2 nats
    (an adversary ignoring x or z is off by over 1 nat)."""
    torch.manual_seed(0)
    xs = torch.eye(4)
    mus = torch.tensor([[1.0, -0.5], [-1.0, 0.5], [0.5, 1.0], [0.0, 0.0]])
    log_var = torch.full((2,), 2 * math.log(0.6))
    t = Adversary(4, 2, [32], [32, 32], 16)
    opt = torch.optim.Adam(t.parameters(), lr=3e-3)
    for _ in range(400):
        i = torch.randint(0, 4, (256,))
        zq = mus[i] + 0.6 * torch.randn(256, 2)
        zp = torch.randn(256, 2)
        loss = torch.nn.functional.softplus(-t(xs[i], zq)).mean() + torch.nn.functional.softplus(t(xs[i], zp)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    i = torch.arange(4).repeat_interleave(2000)
    z = mus[i] + 0.6 * torch.randn(8000, 2)
    truth = log_normal_diag(z, mus[i], log_var) - log_standard_normal(z)
    with torch.no_grad():
        err = t(xs[i], z) - truth
    print("adversary RMS error", float(err.pow(2).mean().sqrt()))
    assert float(err.pow(2).mean().sqrt()) < 0.2


def test_adaptive_contrast_moments_equal_monte_carlo_moments_of_the_encoder():
    """r(z|x)'s mean and variance (closed form in z0, a_i and the noise networks' moments) against
    200,000 draws of the implicit encoder: within 5 standard errors (mean) and 4 % (variance;
    its standard error here is under 0.6 %)."""
    model = tiny_model(**{"model.avb.moment_draws": 200_000})
    with torch.no_grad():
        model.encoder_a.bias.add_(5.0)  # a_i near 1: noise of the size of the mean's spread
        x = (torch.rand(3, 784, generator=torch.Generator().manual_seed(1)) > 0.5).float()
        r = model.posterior(x)
        torch.manual_seed(2)
        z, mean, _ = model.sample_implicit(x, 200_000)
    mc_mean, mc_var = z.mean(0), z.var(0)
    se = (mc_var / z.shape[0]).sqrt()
    assert ((r.mean - mc_mean).abs() < 5 * se).all()
    assert torch.allclose(r.log_var.exp() - VAR_FLOOR, mc_var, rtol=0.04, atol=0)
    # the training-time moments (from the noise of the draws themselves) estimate the same mean
    assert ((mean - mc_mean).abs() < 5 * se).all()
    # and the contrast is not the tiny floor: the variance is of order one
    assert float(mc_var.min()) > 0.01


def test_the_kept_contrast_moments_follow_the_noise_networks_weights():
    model = tiny_model()
    x = torch.rand(4, 784)
    first = model.posterior(x)
    with torch.no_grad():
        model.encoder_noise.weights[0].add_(0.5)  # as an optimizer step changes them: in place
    kept = model.posterior(x)
    model._moments = None
    fresh = model.posterior(x)
    assert not torch.equal(first.log_var, kept.log_var)
    assert torch.equal(kept.mean, fresh.mean) and torch.equal(kept.log_var, fresh.log_var)


def test_ais_from_the_contrast_gaussian_matches_importance_sampling():
    """A stand-in AVB model with two latents and 16 pixels, whose r(z|x) is a tractable density:
    its log p(x) by AIS (200 intermediate distributions, 64 chains, 2 leapfrog, started from r)
    against IS with the prior as the proposal (K = 50,000) and against a 2-D grid (exact to 1e-3 here):
    within 4 of AIS's own standard errors (from its chains' weights; each under 0.1 nats)."""
    cfg = RunConfig().with_overrides({**TINY, "model.avb.ais_steps": 200, "model.avb.ais_chains": 64,
                                      "model.avb.ais_leapfrog": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model, 16).eval()
    with torch.no_grad():
        model.encoder_a.bias.add_(5.0)
        x = model.sample_x_given_z(model.sample_z(6, torch.Generator().manual_seed(3)),
                                   torch.Generator().manual_seed(4))
    res = implicit_log_likelihood(model, x, seed=0)
    with torch.no_grad():
        g = torch.linspace(-7, 7, 401, dtype=torch.float64)
        zz = torch.cartesian_prod(g, g).float()
        cell = math.log(float(g[1] - g[0]) ** 2)
        joint = torch.stack([model.log_joint(x[i:i + 1].expand(zz.shape[0], -1), zz) for i in range(6)]).double()
        grid = torch.logsumexp(joint, 1) + cell
        torch.manual_seed(5)
        lw = model.log_p_x_given_z(x, torch.randn(50_000, 6, 2)).double()
        is_est = torch.logsumexp(lw, 0) - math.log(50_000)
    assert (is_est - grid).abs().max() < 0.02
    w = (res.log_weights - res.log_weights.max(0).values).exp()  # [C, N]
    se = w.std(0) / (w.mean(0) * math.sqrt(w.shape[0]))  # delta-method standard error of log mean w
    print("AIS - grid", res.per_point - grid, "se", se, "IS - grid", is_est - grid)
    assert float(se.max()) < 0.1
    assert ((res.per_point - grid).abs() < 4 * se + 0.02).all()


def test_implicit_posterior_refuses_what_needs_log_q():
    model = tiny_model()
    x = torch.zeros(2, 784)
    with pytest.raises(ModelCapabilityError, match="no density"):
        log_likelihood(model, x, k=2)
    with pytest.raises(SurgeryError, match="implicit"):
        elbo_surgery(model, x)
    with pytest.raises(ModelCapabilityError):
        model.log_weight_terms(x, 1, stop_posterior_grad=True)


def test_avb_refuses_objectives_reading_log_q_in_one_line(tmp_path, capsys):
    rc = main(["train", "--set", "model.name=avb", "--set", "objective.name=iwae", "--set", "objective.k=5",
               "--set", "data.name=binarized-mnist-embedded", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "objective" in err and "implicit" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def small_data(n_train: int = 300) -> ImageDataset:
    full = load("binarized-mnist-embedded")
    return ImageDataset(name="binarized-mnist-embedded", image_shape=full.image_shape, binary=True,
                        source="test subset", splits={"train": full.splits["train"][:n_train],
                                                      "valid": full.splits["valid"][:100],
                                                      "test": full.splits["test"][:100]})


RUN = {**TINY, "data.name": "binarized-mnist-embedded", "train.batch_size": 50, "train.threads": 1,
       "train.lr": 1e-3, "train.eval_every": 1}


def test_the_loop_takes_the_paired_step_and_resume_is_bit_exact(tmp_path, monkeypatch):
    """Two epochs in one go against a run that crashes at step 9 (its last checkpoint: step 6,
    mid-epoch) and is resumed: the model (adversary included) and both optimizers' states end
    bit-identical."""
    cfg = RunConfig().with_overrides({**RUN, "train.epochs": 2, "train.checkpoint_steps": 3})
    whole = RunState(cfg, tmp_path / "whole", small_data())
    assert isinstance(make_step([whole.step_run()]), AdversarialStep)
    fit(whole)
    # validation scores with its own seed: the training stream goes on as if it had not run
    quiet = RunState(RunConfig().with_overrides({**RUN, "train.epochs": 2, "train.checkpoint_steps": 3,
                                                 "train.eval_every": 0}), tmp_path / "quiet", small_data())
    fit(quiet)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                 quiet.model.state_dict().values(), strict=True))

    calls = {"n": 0}
    plain = AdversarialStep._step

    def crash_at_9(self, x, beta):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("crash")
        return plain(self, x, beta)

    monkeypatch.setattr(AdversarialStep, "_step", crash_at_9)
    with pytest.raises(RuntimeError, match="crash"):
        fit(RunState(cfg, tmp_path / "split", small_data()))
    monkeypatch.setattr(AdversarialStep, "_step", plain)
    ck = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 6 and ck["adversary_optimizer"]["state"]
    torch.manual_seed(123)  # whatever ran since: the checkpoint carries every stream
    resumed = RunState(cfg, tmp_path / "split", small_data())
    fit(resumed, resume=True)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("adversary.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for oa, ob in ((whole.optimizer, resumed.optimizer), (whole.adversary_optimizer, resumed.adversary_optimizer)):
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # the VAE's optimizer holds no adversary parameter, the adversary's nothing else
    n_adv = sum(1 for _ in whole.model.adversary.parameters())
    assert len(whole.adversary_optimizer.param_groups[0]["params"]) == n_adv
    assert len(whole.optimizer.param_groups[0]["params"]) == sum(1 for _ in whole.model.parameters()) - n_adv


def test_a_checkpoint_without_the_adversary_state_is_refused(tmp_path):
    cfg = RunConfig().with_overrides({**RUN, "train.epochs": 1})
    state = RunState(cfg, tmp_path / "r", small_data(100))
    saved = state.state()
    saved.pop("adversary_optimizer")
    with pytest.raises(Exception, match="adversary"):
        state.load_state(saved)


def test_short_training_on_the_embedded_data_beats_independent_pixels(tmp_path):
    """Independent Bernoulli pixels at the training means score -238 nats on these 50 images;
    an AVB model can only beat that through its latents (its decoder is an MLP of z). After
    320 paired steps on 2,000 embedded images, AIS (50 distributions, 4 chains) gives above
    -215 nats (measured -195.1). A broken KL estimate (an adversary that says q = r) would show
    as an estimated ELBO above the AIS log-likelihood; we ask ELBO <= AIS + 3 (measured -199.9)."""
    data = small_data(2000)
    cfg = RunConfig().with_overrides({**RUN, "model.latent_dim": 8, "model.hidden": [64], "train.epochs": 8,
                                      "train.eval_every": 0, "train.lr": 3e-3, "model.avb.ais_steps": 50,
                                      "model.avb.ais_chains": 4, "model.avb.ais_leapfrog": 5})
    state = RunState(cfg, tmp_path / "r", data)
    fit(state)
    model = state.model.eval()
    x = data.as_float("test")[:50]
    p = data.as_float("train").mean(0).clamp(1e-3, 1 - 1e-3)
    independent = float((x * p.log() + (1 - x) * (1 - p).log()).sum(1).mean())
    ll = float(implicit_log_likelihood(model, x, seed=0).per_point.mean())
    with torch.no_grad():
        torch.manual_seed(0)
        elbo = float(torch.stack([model.estimated_elbo(x) for _ in range(10)]).mean())
    assert independent < -230
    assert ll > -215
    assert elbo <= ll + 3


def test_avb_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="eps_nbasis"):
        RunConfig().with_overrides({"model.avb.eps_nbasis": 0})


def test_the_avb_row_trains_and_is_scored_by_ais_through_reproduce(tmp_path, monkeypatch):
    """Row mnist-avb-ac on 200 embedded images, tiny sizes: it trains through the one loop, is
    scored by AIS with the budget's settings, and its table note states them."""
    register_tiny_embedded(monkeypatch, train=200)
    over = {**{k: v for k, v in TINY.items() if k.startswith("model.")}, "data.name": "tiny-embedded",
            "train.epochs": 1, "eval.test_images": 10, "model.avb.ais_steps": 10, "model.avb.ais_chains": 2,
            "train.threads": 1}
    rep = reproduce("vampprior-table", budget="quick", only=["mnist-avb-ac"], results=tmp_path, overrides=over)
    assert rep.trained == ["mnist-avb-ac"] and not rep.failed
    out = tmp_path / "vampprior-table" / "quick" / "rows"
    row = json.loads(next(out.iterdir()).joinpath("result.json").read_text())["metrics"]
    assert row["ais_steps"] == 10 and row["ais_chains"] == 2 and row["ais_leapfrog"] == 5 and row["n_test"] == 10
    assert -400 < row["log_likelihood"] < 0
    md = rep.outputs["markdown"].read_text()
    assert "Row mnist-avb-ac: 3 epochs; test LL by AIS" in md


def test_python_api_trains_avb_with_both_optimizers(tmp_path):
    """elbolab.train with model.name=avb, and train_model on an AVB model: the adversary moves
    only by its own loss (the VAE's optimizer does not hold it), and the bound rises."""
    import elbolab

    x = small_data(200).splits["train"]
    run = elbolab.train(x, tmp_path / "run", **{**TINY, "train.epochs": 2, "train.batch_size": 50,
                                                "train.threads": 1, "model.avb.ais_steps": 5,
                                                "model.avb.ais_chains": 2, "eval.test_images": 5})
    assert isinstance(run.model, AVBModel)
    report = elbolab.evaluate(run, x[:5])
    assert report["log_likelihood"]["label"].startswith("AIS T=5, 2 chains")
    assert report["log_likelihood"]["mean"] < 0 and report["elbo_estimated_by"]
    with pytest.raises(ModelCapabilityError, match="no density"):
        elbolab.diagnose(run, x[:5], out=tmp_path / "diag")
    model = tiny_model()
    before = [p.detach().clone() for p in model.adversary_parameters()]
    bounds = elbolab.train_model(model, x.float(), epochs=3, batch_size=50, objective="vae", k=1, progress=False)
    assert bounds[-1] > bounds[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.adversary_parameters(), strict=True))
    with pytest.raises(ConfigError, match="adversary"):
        elbolab.train_model(model, x.float(), epochs=1, objective="iwae", k=5, progress=False)


def test_avb_runs_of_a_sweep_train_alone(tmp_path):
    """A stack steps one optimizer per run: AVB's two are stepped by its own step, run by run."""
    cfg = RunConfig().with_overrides({**RUN, "train.epochs": 1})
    assert pack([cfg, cfg]) == [[0], [1]]
    runs = [RunState(cfg, tmp_path / str(i), small_data(100)).step_run() for i in range(2)]
    with pytest.raises(ValueError, match="alone"):
        make_step(runs)
