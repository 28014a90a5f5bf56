"""VLAE (Chen et al. 2016): the autoregressive-flow prior, the local PixelCNN decoder, free bits,
the IS bound against float64 quadrature, the table row, and a short training on the embedded data."""

from __future__ import annotations

import math

import pytest
import torch

from elbolab.config import ConfigError, RunConfig, preset
from elbolab.data import load
from elbolab.errors import ModelCapabilityError
from elbolab.evaluation import evaluate_bounds, log_likelihood
from elbolab.models import build_model
from elbolab.models.conv_layers import causal_mask
from elbolab.models.vlae import VLAE
from elbolab.objectives import vae_objective
from elbolab.priors import AutoregressiveFlowPrior, MixtureOfGaussians, StandardNormal
from elbolab.reproduce.tables import BUDGETS, get_table, plan_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def af_prior(d: int = 2, steps: int = 2, width: int = 12, scale: float = 1.5, seed: int = 0) -> AutoregressiveFlowPrior:
    """A float64 AF prior far from the identity: every MADE weight scaled up by ``scale``."""
    torch.manual_seed(seed)
    prior = AutoregressiveFlowPrior(d, steps, width).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(scale).add_(0.3 * torch.randn_like(p))
    return prior


def tiny_vlae(shape=(3, 3), latent=2, layers=2, channels=4, prior=None, seed=0, **kw) -> VLAE:
    torch.manual_seed(seed)
    model = VLAE(shape, latent, "bernoulli", prior if prior is not None else af_prior(latent), encoder_channels=(2, 3),
                 encoder_out_channels=2, decoder_channels=channels, decoder_layers=layers, **kw).double()
    return model


def grid(lo: float, hi: float, n: int) -> tuple[torch.Tensor, float]:
    """``[n * n, 2]`` points of a square grid and the area of one cell."""
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    return zz, float(t[1] - t[0]) ** 2


# --- the autoregressive-flow prior ------------------------------------------------------------


def test_af_prior_density_integrates_to_one_on_a_2d_grid():
    prior = af_prior()
    zz, cell = grid(-12.0, 12.0, 481)
    with torch.no_grad():
        mass = float(prior.log_prob(zz).exp().sum() * cell)
        # the same density without the log-determinant is not normalized: the check can fail
        eps, _ = prior.to_noise(zz)
        wrong = float(StandardNormal(2).log_prob(eps).exp().sum() * cell)
    assert abs(mass - 1.0) < 1e-4, mass
    assert abs(wrong - 1.0) > 0.05, wrong


def test_af_prior_step_jacobians_are_triangular_and_give_the_log_determinant():
    prior = af_prior(d=5, steps=3, width=10)
    z = torch.randn(5, dtype=torch.float64)
    y = z
    for step in prior.layers:
        def g(v, step=step):
            m, s = step.made(v)
            return (v - (1.0 - torch.sigmoid(s)) * m) / torch.sigmoid(s)

        jac = torch.autograd.functional.jacobian(g, y)
        order = step.order
        in_order = jac[order][:, order]  # rows and columns in the order this step reads the units
        assert float(in_order.triu(1).abs().max()) == 0.0
        assert float(in_order.tril(-1).abs().max()) > 1e-3  # a real dependence below the diagonal
        y = g(y)
    # per-unit log-determinants sum to log |det| of the whole map z -> eps (autograd, float64)
    jac = torch.autograd.functional.jacobian(lambda v: prior.to_noise(v)[0], z)
    _, log_det = prior.to_noise(z)
    torch.testing.assert_close(log_det.sum(), torch.linalg.slogdet(jac)[1])


def test_af_prior_sampling_inverts_the_density_pass():
    prior = af_prior(d=6, steps=3, width=24)
    z = torch.randn(50, 6, dtype=torch.float64)
    eps, _ = prior.to_noise(z)
    torch.testing.assert_close(prior.from_noise(eps), z, rtol=0, atol=1e-10)
    eps = torch.randn(50, 6, dtype=torch.float64)
    torch.testing.assert_close(prior.to_noise(prior.from_noise(eps))[0], eps, rtol=0, atol=1e-10)
    # draws follow the density: E_p[log p(z)] by sampling matches the grid integral of p log p (2-D)
    prior = af_prior()
    samples = prior.sample(20000, torch.Generator().manual_seed(0))
    lp = prior.log_prob(samples).detach()
    zz, cell = grid(-12.0, 12.0, 481)
    with torch.no_grad():
        p = prior.log_prob(zz)
        exact = float((p.exp() * p).sum() * cell)
    se = float(lp.std()) / math.sqrt(len(lp))
    assert abs(float(lp.mean()) - exact) < 4 * se, (float(lp.mean()), exact, se)


def test_af_prior_per_unit_terms_sum_to_its_log_density():
    prior = af_prior(d=4, width=16)
    z = torch.randn(3, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(prior.log_prob_dims(z).sum(-1), prior.log_prob(z))
    with pytest.raises(ModelCapabilityError, match="free bits"):
        MixtureOfGaussians(2, 3).log_prob_dims(z[..., :2].float())


# --- the local PixelCNN ---------------------------------------------------------------------


def pixel_dependence(model: VLAE, z: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``[D, D]`` |d output_o / d x_i| at a random image (the Bernoulli logit of each pixel)."""
    x = torch.rand(1, shape[0] * shape[1], dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda v: model.p_x(v, z)[0], x)[:, 0].abs()


def allowed_field(shape: tuple[int, int], reach: int) -> torch.Tensor:
    """``[D, D]`` True where output pixel o may read input pixel i: i before o in raster order,
    rows o_r - L .. o_r and columns o_c - L .. o_c + L (the stated receptive field)."""
    h, w = shape
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    idx = torch.arange(h * w)
    before = idx[None, :] < idx[:, None]
    rows = (r[None, :] >= r[:, None] - reach) & (r[None, :] <= r[:, None])
    cols = (c[None, :] - c[:, None]).abs() <= reach
    return before & rows & cols


def test_local_pixelcnn_reads_only_earlier_pixels_inside_its_stated_field():
    shape, reach = (9, 9), 2
    model = tiny_vlae(shape, layers=reach, channels=16)
    assert model.p_x.reach == reach
    z = torch.randn(1, 2, dtype=torch.float64)
    dep = pixel_dependence(model, z, shape)
    field = allowed_field(shape, reach)
    assert float(dep[~field].max()) == 0.0
    # the field is reached: pixel (r - L, c) above and (r, c - 1) beside the centre are read
    w = shape[1]
    for r, c in [(4, 4), (8, 2), (2, 6)]:
        o = r * w + c
        assert dep[o, (r - reach) * w + c] > 0 and dep[o, r * w + c - 1] > 0
    # one more layer reads beyond the stated field: the check sees it
    wider = tiny_vlae(shape, layers=reach + 1, channels=16)
    assert float(pixel_dependence(wider, z, shape)[~field].max()) > 0
    # a type-B first layer lets pixel i see itself: the check sees that too
    model.p_x.net[0].mask.copy_(causal_mask(3, "B"))
    assert bool((pixel_dependence(model, z, shape).diagonal() > 0).all())


def test_autoregressive_draws_carry_the_parameters_of_one_teacher_forced_pass():
    model = tiny_vlae((5, 4), layers=2, channels=6).eval()
    z = torch.randn(3, 2, dtype=torch.float64)
    x, means = model.decode_sample_and_mean(z, torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        torch.testing.assert_close(means, torch.sigmoid(model.p_x(x, z)))


# --- the IS bound against float64 quadrature over a 2-D latent --------------------------------


def test_is_log_likelihood_matches_float64_quadrature():
    """log p(x) = log int p(x|z) p(z) dz on a grid (the AF prior's density and the PixelCNN's
    conditionals, float64) against the model's IS estimate with K = 5,000 (within 4 standard errors)."""
    model = tiny_vlae().eval()
    x = (torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    zz, cell = grid(-10.0, 10.0, 201)
    with torch.no_grad():
        log_joint = model.log_joint(x, zz[:, None, :].expand(-1, 3, -1))  # [n, 3]
        exact = torch.logsumexp(log_joint, 0) + math.log(cell)
        torch.manual_seed(0)
        lw = model.log_weights(x, 5000)
    w = torch.exp(lw - lw.max(0).values)
    se = w.std(0) / w.mean(0) / math.sqrt(lw.shape[0])  # delta-method standard error of log mean w
    assert float(se.max()) < 0.02
    est = log_likelihood(model, x, k=5000, chunk_size=2500).per_point
    assert bool(((est - exact).abs() < 4 * se).all()), (est, exact, se)
    # a decoder reading its own pixel would no longer be normalized: the quadrature would show it
    assert bool((exact < 0).all())


# --- free bits -------------------------------------------------------------------------------


def grads(model: VLAE, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(seed)
    vae_objective(model, x, 1).loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_free_bits_cancel_the_kl_gradient_of_groups_under_the_floor_only():
    x = (torch.rand(6, 9, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    plain = tiny_vlae(latent=4, prior=StandardNormal(4), free_bits_groups=2)
    floored = tiny_vlae(latent=4, prior=StandardNormal(4), free_bits_groups=2)
    floored.load_state_dict(plain.state_dict())
    floored.free_bits = 1e6  # every group under its floor: only E[log p(x|z)] is followed
    torch.manual_seed(5)
    terms = plain.log_weight_terms(x, 1)
    target = terms.log_likelihood.mean()
    want = torch.autograd.grad(target, list(plain.parameters()), allow_unused=True)
    got = grads(floored, x, 5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, -(w if w is not None else torch.zeros_like(g)))
    # the value is still the ELBO, and off the floor the gradient is the plain ELBO's
    torch.manual_seed(5)
    assert float(floored.log_weight_terms(x, 1).free_bits.detach().abs().max()) == 0.0
    floored.free_bits = 1e-9
    for g, w in zip(grads(floored, x, 5), grads(plain, x, 5), strict=True):
        torch.testing.assert_close(g, w)
    # in eval mode (the IS bound) no free-bits term is made
    floored.free_bits = 1e6
    assert floored.eval().log_weight_terms(x, 1).free_bits is None


def test_free_bits_refuse_what_cannot_split_the_kl_by_unit():
    with pytest.raises(ValueError, match="model.vlae.free_bits: .*Mixture.*free bits need it"):
        tiny_vlae(latent=2, prior=MixtureOfGaussians(2, 3).double(), free_bits=0.5)
    with pytest.raises(ConfigError, match="model.vlae.free_bits_groups"):
        RunConfig().with_overrides({"model.name": "vlae", "model.vlae.latent_dim": 10, "model.vlae.free_bits": 1.0,
                                    "model.vlae.free_bits_groups": 4})


# --- registry, config and the table row -------------------------------------------------------


def test_the_vlae_preset_is_the_vampprior_protocol_with_vlae_and_the_af_prior():
    cfg, paper = preset("vlae"), preset("vampprior-paper")
    assert (cfg.model.name, cfg.model.prior.name) == ("vlae", "af")
    assert (cfg.train, cfg.objective, cfg.data) == (paper.train, paper.objective, paper.data)


def test_vlae_builds_from_a_config_with_the_af_prior():
    cfg = RunConfig().with_overrides({"model.name": "vlae", "model.prior.name": "af", "model.prior.flow_steps": 3,
                                      "model.prior.flow_width": 64, "model.vlae.latent_dim": 16})
    model = build_model(cfg.model, 784, dataset="binarized-mnist")
    assert isinstance(model, VLAE) and isinstance(model.prior, AutoregressiveFlowPrior)
    assert len(model.prior.layers) == 3 and model.latent_dims == [16] and model.image_shape == (28, 28)


@pytest.mark.parametrize("budget", BUDGETS)
def test_the_vampprior_table_has_a_vlae_row_at_every_budget(budget):
    table = get_table("vampprior-table")
    row = table.row("mnist-vlae")
    assert row.values["log_likelihood"].value == -79.03 and row.stand_in
    (plan,) = plan_rows(table, budget, only=["mnist-vlae"])
    cfg = plan.config
    assert (cfg.model.name, cfg.model.prior.name, cfg.data.name) == ("vlae", "af", "binarized-mnist")
    if budget == "quick":
        assert cfg.eval.test_images < 10000 and cfg.train.epochs <= 2
        assert "mnist-vlae" in table.protocol.notes_for("quick")


# --- a short training on the embedded data ----------------------------------------------------


@pytest.mark.slow
def test_short_training_beats_independent_pixels():
    """60 Adam steps (batch 50, lr 1e-2) of a small VLAE (8 latents, AF prior of width 32, 2 masked
    layers of 8 channels) on the embedded binarized MNIST, then the ELBO on 300 test images.
    Independent pixels at the training means score -227 nats on them and the untrained model
    about -520; the trained bound must beat independent pixels by 60 nats (measured: -126), yet
    stay under -60 (a pixel that saw itself would score far higher)."""
    data = load("binarized-mnist-embedded")
    train, test = data.as_float("train"), data.as_float("test")[:300]
    p = train.mean(0).clamp(1e-3, 1 - 1e-3)
    independent = float((test * p.log() + (1 - test) * (1 - p).log()).sum(1).mean())
    cfg = RunConfig().with_overrides({"model.name": "vlae", "model.prior.name": "af", "model.prior.flow_width": 32,
                                      "model.vlae.latent_dim": 8, "model.vlae.encoder_channels": [4, 8],
                                      "model.vlae.encoder_out_channels": 2, "model.vlae.decoder_channels": 8,
                                      "model.vlae.decoder_layers": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model, 784, train[:1000], dataset="binarized-mnist-embedded")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = train[torch.randint(0, len(train), (50,), generator=g)]
        opt.zero_grad()
        vae_objective(model, x, 1).loss.backward()
        opt.step()
    model.eval()
    torch.manual_seed(0)
    elbo = evaluate_bounds(model, test, k=1)["elbo"]
    assert -230 < independent < -225
    assert independent + 60 < elbo < -60, (elbo, independent)
