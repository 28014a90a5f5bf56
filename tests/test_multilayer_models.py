"""Two-layer (IWAE paper) and hierarchical (VampPrior paper) models: exact assembly of the
log weights from their component densities, and IS log p(x) against quadrature."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, MixtureSameFamily, Normal

from elbolab.diagnostics import active_units
from elbolab.models import HierarchicalVAE, OneLayerVAE, TwoLayerVAE
from elbolab.priors import MixtureOfGaussians, StandardNormal, VampPriorData

pytestmark = pytest.mark.usefixtures("one_thread")


def normal(mean, log_var):
    return Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)


def mixture(prior: MixtureOfGaussians):
    return MixtureSameFamily(Categorical(logits=prior.logits), normal(prior.means, prior.log_vars))


def bernoulli(logits):
    return Independent(Bernoulli(logits=logits), 1)


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((5, 6), 0.4, dtype=torch.float64))


def test_two_layer_log_weights_equal_hand_assembly(x):
    prior = MixtureOfGaussians(2, 3, learn_weights=True)
    model = TwoLayerVAE(6, (3, 2), (5, 4), (4,), "tanh", "bernoulli", prior).double()
    with torch.no_grad():
        prior.logits.normal_()
    terms = model.log_weight_terms(x, 4)
    z1, z2 = terms.z["z1"], terms.z["z2"]
    assert z1.shape == (4, 5, 3) and z2.shape == (4, 5, 2)
    by_hand = (
        bernoulli(model.likelihood.head(model.p_x(z1))).log_prob(x)  # log p(x | z1)
        + normal(*model.p_z1(z2)).log_prob(z1)  # log p(z1 | z2)
        + mixture(prior).log_prob(z2)  # log p(z2)
        - normal(*model.q_z1(x)).log_prob(z1)  # log q(z1 | x)
        - normal(*model.q_z2(z1)).log_prob(z2)  # log q(z2 | z1)
    )
    torch.testing.assert_close(terms.log_weights(), by_hand, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(model.log_weights(x, 4).shape, by_hand.shape)
    # warm-up scales every layer's KL term
    kl = terms.kl()
    torch.testing.assert_close(terms.log_weights(0.25), terms.log_likelihood - 0.25 * kl)


def test_hierarchical_log_weights_equal_hand_assembly(x):
    prior = VampPriorData(2, 6, 4, torch.rand(4, 6))
    model = HierarchicalVAE(6, (3, 2), 5, (-6.0, 2.0), "bernoulli", prior).double()
    terms = model.log_weight_terms(x, 4)
    z1, z2 = terms.z["z1"], terms.z["z2"]
    u = prior.images.double()
    q_u = model.q_z2(u)  # the VampPrior: (1/C) sum_c q(z2 | u_c)
    log_p2 = torch.logsumexp(torch.stack([normal(q_u[0][c], q_u[1][c]).log_prob(z2) for c in range(4)]), 0) \
        - math.log(4)
    hx = model.q_z1.body
    h = hx.joint(torch.cat([hx.a(x).expand(4, 5, -1), hx.b(z2)], -1))
    m1, lv1 = model.q_z1.head(h)
    by_hand = (
        bernoulli(model.decode(z1, z2)).log_prob(x)  # log p(x | z1, z2)
        + normal(*model.p_z1(z2)).log_prob(z1)  # log p(z1 | z2)
        + log_p2  # log p(z2)
        - normal(*model.q_z2(x)).log_prob(z2)  # log q(z2 | x)
        - normal(m1, lv1).log_prob(z1)  # log q(z1 | x, z2)
    )
    torch.testing.assert_close(terms.log_weights(), by_hand, rtol=1e-12, atol=1e-10)


def test_hierarchical_clamps_log_variances_like_the_paper_code():
    model = HierarchicalVAE(6, (3, 2), 5, (-6.0, 2.0), "bernoulli", StandardNormal(2)).double()
    with torch.no_grad():
        model.q_z2.head.linear.bias.fill_(50.0)
    q = model.posterior(torch.rand(3, 6, dtype=torch.float64))
    assert float(q.log_var.detach().max()) == 2.0


def test_stop_posterior_grad_keeps_the_path_through_lower_samples(x):
    """STL: q's parameters carry no score gradient, but the sample paths stay.

    For log N(m + s eps; m, s) the full gradient w.r.t. the mean m is exactly 0 (path and
    score cancel); with the parameters stopped only the path -eps / s remains.
    """
    model = TwoLayerVAE(6, (3, 2), (5,), (4,), "tanh", "bernoulli", StandardNormal(2)).double()
    bias = model.q_z2.head.linear.bias  # [mean (2), log-var (2)]
    torch.manual_seed(1)
    full = model.log_weight_terms(x, 3)
    (g_full,) = torch.autograd.grad(full.log_posterior["z2"].sum(), bias)
    torch.testing.assert_close(g_full[:2], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.manual_seed(1)
    stl = model.log_weight_terms(x, 3, stop_posterior_grad=True)
    torch.testing.assert_close(stl.log_weights(), full.log_weights())
    z1, z2 = stl.z["z1"], stl.z["z2"]
    m2, lv2 = model.q_z2(z1)
    (g_stl,) = torch.autograd.grad(stl.log_posterior["z2"].sum(), bias, retain_graph=True)
    want = (-(z2 - m2) * torch.exp(-lv2)).sum((0, 1))
    torch.testing.assert_close(g_stl[:2], want.detach())
    (g_q1,) = torch.autograd.grad(stl.log_posterior["z2"].sum(), model.q_z1.head.linear.weight)
    assert g_q1.abs().sum() > 0  # through z1 = mu1 + s1 * eps into q(z2 | z1)


GRID = torch.linspace(-9, 9, 481, dtype=torch.float64)
STEP = float(GRID[1] - GRID[0])


def is_estimate(model, x, k=16_000, chunk=4_000):
    """L_K and its delta-method standard error: sqrt(Var(w) / K) / mean(w)."""
    torch.manual_seed(0)
    lw = torch.cat([model.log_weights(x, chunk) for _ in range(k // chunk)]).double()
    est = torch.logsumexp(lw, 0) - math.log(k)
    w = torch.exp(lw - est)
    return est, w.std(0) / math.sqrt(k)


@torch.no_grad()
def test_one_layer_is_estimate_matches_quadrature(x):
    model = OneLayerVAE(6, 1, (4,), "tanh", "bernoulli", MixtureOfGaussians(1, 3)).double()
    z = GRID[:, None, None]  # [G, 1, 1] -> broadcast over the batch
    log_joint = model.likelihood.log_prob(x, model.decode(z.expand(-1, x.shape[0], 1))) + model.prior.log_prob(z)
    exact = torch.logsumexp(log_joint, 0) + math.log(STEP)
    est, se = is_estimate(model, x)
    assert ((est - exact).abs() < 5 * se + 1e-3).all(), (est, exact, se)


@torch.no_grad()
def test_two_layer_is_estimate_matches_2d_quadrature(x):
    model = TwoLayerVAE(6, (1, 1), (4,), (3,), "tanh", "bernoulli", StandardNormal(1)).double()
    g1, g2 = torch.meshgrid(GRID, GRID, indexing="ij")
    z1, z2 = g1.reshape(-1, 1, 1), g2.reshape(-1, 1, 1)  # [G^2, 1, 1]
    log_joint = (
        model.likelihood.log_prob(x, model.likelihood.head(model.p_x(z1)).expand(-1, x.shape[0], -1))
        + normal(*model.p_z1(z2)).log_prob(z1)
        + model.prior.log_prob(z2)
    )
    exact = torch.logsumexp(log_joint, 0) + 2 * math.log(STEP)
    est, se = is_estimate(model, x)
    assert ((est - exact).abs() < 5 * se + 1e-3).all(), (est, exact, se)


@torch.no_grad()
def test_hierarchical_is_estimate_matches_2d_quadrature(x):
    prior = VampPriorData(1, 6, 3, torch.rand(3, 6))
    # variances floored at e^-2 so the grid resolves p(z1 | z2)
    model = HierarchicalVAE(6, (1, 1), 4, (-2.0, 2.0), "bernoulli", prior).double()
    g1, g2 = torch.meshgrid(GRID, GRID, indexing="ij")
    z1, z2 = g1.reshape(-1, 1, 1), g2.reshape(-1, 1, 1)
    log_joint = (
        model.likelihood.log_prob(x, model.decode(z1, z2).expand(-1, x.shape[0], -1))
        + normal(*model.p_z1(z2)).log_prob(z1)
        + model.prior.log_prob(z2)
    )
    exact = torch.logsumexp(log_joint, 0) + 2 * math.log(STEP)
    est, se = is_estimate(model, x)
    assert ((est - exact).abs() < 5 * se + 1e-3).all(), (est, exact, se)


def test_conditional_means_and_active_units_per_layer(x):
    two = TwoLayerVAE(6, (3, 2), (5,), (4,), "tanh", "bernoulli", StandardNormal(2)).double()
    m1, m2 = two.conditional_means(x, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(m1, two.q_z1(x)[0])  # exact: no sample axis
    z1 = two.posterior(x).rsample(4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(m2, two.q_z2(z1)[0])  # [K, B, D2] at the draws of z1
    hier = HierarchicalVAE(6, (3, 2), 5, (-6.0, 2.0), "bernoulli", StandardNormal(2)).double()
    h1, h2 = hier.conditional_means(x, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(h2, hier.q_z2(x)[0])
    z2 = hier.posterior(x).rsample(4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(h1, hier.q_z1(x, z2)[0])
    assert h1.shape == (4, 5, 3)
    au = active_units(two, x, threshold=1e-12)
    assert [a.numel() for a in au.activity] == [3, 2]


def test_ancestral_samples_start_from_the_prior():
    prior = VampPriorData(2, 6, 1, torch.rand(1, 6))
    model = HierarchicalVAE(6, (3, 2), 5, (-6.0, 2.0), "bernoulli", prior).double()
    z = model.sample_latents(7, torch.Generator().manual_seed(0))
    assert z.shape == (7, 5)
    images = model.sample(7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, model.decode_mean(z))
    assert images.shape == (7, 6) and images.min() >= 0 and images.max() <= 1
    two = TwoLayerVAE(6, (3, 2), (5,), (4,), "tanh", "bernoulli", StandardNormal(2))
    assert two.sample_latents(4).shape == (4, 3)


def test_iwae_paper_two_layer_architecture_is_the_papers():
    """Burda et al. section 5 and their experiments.py (hidden_units_q [[200, 200], [100, 100]],
    hidden_units_p [[100, 100], [200, 200]], latents [100, 50]): every layer's shape, in order."""
    from elbolab.config import preset
    from elbolab.models import build_model
    from elbolab.reproduce.tables import get_table, plan_rows

    cfg = preset("iwae-paper-two-layer").model
    model = build_model(cfg, 784)

    def shapes(module):
        return [tuple(m.weight.shape[::-1]) for m in module.modules() if isinstance(m, torch.nn.Linear)]

    assert shapes(model.q_z1) == [(784, 200), (200, 200), (200, 2 * 100)]  # head: mean and log-variance
    assert shapes(model.q_z2) == [(100, 100), (100, 100), (100, 2 * 50)]
    assert shapes(model.p_z1) == [(50, 100), (100, 100), (100, 2 * 100)]
    assert shapes(model.p_x) + shapes(model.likelihood) == [(100, 200), (200, 200), (200, 784)]
    assert {type(m).__name__ for m in model.modules() if not list(m.children())} == {"Linear", "Tanh",
                                                                                     "StandardNormal"}
    rows = [p.config.model for p in plan_rows(get_table("iwae-table"), "paper") if p.config.model.name == "two-layer"]
    assert len(rows) == 12 and all(m.two_layer == cfg.two_layer for m in rows)


# --- every two-level model: one shared implementation of the diagnostics' protocol ----------------

TINY_TWO_LEVEL = {
    "model.two_layer.latent_dims": [4, 3], "model.two_layer.hidden1": [16], "model.two_layer.hidden2": [8],
    "model.hierarchical.latent_dims": [4, 3], "model.hierarchical.width": 16,
    **{f"model.{key}.{name}": value for key in ("conv_hierarchical", "pixel_hierarchical") for name, value in (
        ("latent_dims", [4, 3]), ("width", 8), ("encoder_channels", [2, 3]), ("encoder_out_channels", 2),
        ("decoder_channels", 3), ("decoder_layers", 1), ("image_shape", [4, 5]))},
}


@pytest.mark.parametrize("name", ["two-layer", "hierarchical", "conv-hierarchical", "pixel-hierarchical"])
def test_every_two_level_model_exposes_its_joint_density_and_local_posterior(name):
    """log p(x, z) at q's own draws is the log weight's p-part; the per-point posterior at the
    encoder's output reproduces the log weights draw for draw (the convolutional models used
    to refuse both, so AIS, HMC and q* could not run on them)."""
    from elbolab.config import RunConfig
    from elbolab.models import build_model

    x = (torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    cfg = RunConfig().with_overrides({**TINY_TWO_LEVEL, "model.name": name})
    torch.manual_seed(0)
    model = build_model(cfg.model, 20, x).double().eval()
    torch.manual_seed(1)
    terms = model.log_weight_terms(x, 5)
    flat = model.flatten_latents(terms.z)
    torch.testing.assert_close(model.log_joint(x, flat), terms.log_likelihood + sum(terms.log_prior.values()))
    torch.manual_seed(2)
    lw = model.log_weights(x, 5)
    torch.manual_seed(2)
    torch.testing.assert_close(model.log_weights_local(x, 5, model.local_posterior(x)), lw)
    draws = model.sample_x_given_z(model.sample_z(4, torch.Generator().manual_seed(3)), torch.Generator())
    assert draws.shape == (4, 20) and set(draws.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name, old_names", [
    ("hierarchical", {"q_z1.body.": "q_z1.features."}),
    ("conv-hierarchical", {"q_z2.body.": "q_z2.features.", "q_z1.body.a.": "q_z1.x_features.",
                           "q_z1.body.b.": "q_z1.z_features.", "q_z1.body.joint.": "q_z1.joint."}),
])
def test_weights_saved_under_the_old_module_names_still_load(name, old_names):
    from elbolab.config import RunConfig
    from elbolab.models import build_model

    cfg = RunConfig().with_overrides({**TINY_TWO_LEVEL, "model.name": name}).model
    torch.manual_seed(0)
    saved = build_model(cfg, 20).state_dict()
    old = {}
    for key, value in saved.items():
        prefix = next((p for p in old_names if key.startswith(p)), None)
        old[key if prefix is None else old_names[prefix] + key[len(prefix):]] = value
    assert len(set(old) - set(saved)) >= 6  # the old layout really differs
    torch.manual_seed(1)
    fresh = build_model(cfg, 20)
    fresh.load_state_dict(old)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
