"""Priors: mixture and VampPrior densities against direct float64 sums, gradients, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from elbolab import bounds
from elbolab.config import ConfigError, RunConfig, preset
from elbolab.data.registry import pseudo_input_init
from elbolab.distributions import DiagonalGaussian, log_normal_diag, log_standard_normal
from elbolab.models import HierarchicalVAE, OneLayerVAE, TwoLayerVAE, build_model
from elbolab.priors import MixtureOfGaussians, StandardNormal, VampPrior, VampPriorData

pytestmark = pytest.mark.usefixtures("one_thread")


def direct_mixture(z, means, log_vars, log_mix):
    """float64 reference: a loop over components and a logsumexp."""
    z = z.double()
    per = [log_normal_diag(z, means[c].double(), log_vars[c].double()) + log_mix[c].double()
           for c in range(means.shape[0])]
    return torch.logsumexp(torch.stack(per), dim=0)


def tiny_one_layer(prior, data_dim=6, latent=3):
    return OneLayerVAE(data_dim, latent, (5,), "tanh", "bernoulli", prior)


def tiny_two_layer(prior, data_dim=6, dims=(3, 2)):
    return TwoLayerVAE(data_dim, dims, (5,), (4,), "tanh", "bernoulli", prior)


def tiny_hierarchical(prior, data_dim=6, dims=(3, 2), log_var_range=(-6.0, 2.0)):
    return HierarchicalVAE(data_dim, dims, 5, log_var_range, "bernoulli", prior)


def test_mixture_log_prob_matches_direct_float64_sum():
    prior = MixtureOfGaussians(4, components=7, learn_weights=True)
    with torch.no_grad():
        prior.means.normal_(0, 2)
        prior.log_vars.uniform_(-9, 2)  # tiny variances: where a float32 GEMM expansion would cancel
        prior.logits.normal_()
    z = torch.randn(5, 3, 4) * 2
    comp, log_mix = prior.components()
    got = prior.log_prob(z)
    want = direct_mixture(z, comp.mean, comp.log_var, log_mix)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    # float64 all the way: agreement to rounding
    prior64 = prior.double()
    got64 = prior64.log_prob(z.double())
    torch.testing.assert_close(got64, want, rtol=1e-9, atol=1e-9)


def test_mixture_log_prob_chunked_equals_unchunked():
    from elbolab.distributions import log_normal_diag_mixture

    m, lv, lw = torch.randn(9, 3), torch.randn(9, 3), torch.log_softmax(torch.randn(9), 0)
    z = torch.randn(4, 11, 3)
    torch.testing.assert_close(log_normal_diag_mixture(z, m, lv, lw, max_elements=20),
                               log_normal_diag_mixture(z, m, lv, lw))


def separate_top_posterior(model, u):
    """q over the prior's layer at one input, through the model's sub-networks directly."""
    if isinstance(model, OneLayerVAE):
        return DiagonalGaussian(*model.encoder_head(model.encoder(u)))
    if isinstance(model, TwoLayerVAE):
        m1, _ = model.q_z1(u)
        return DiagonalGaussian(*model.q_z2(m1))
    return DiagonalGaussian(*model.q_z2(u))


@pytest.mark.parametrize("make", [tiny_one_layer, tiny_two_layer, tiny_hierarchical])
@pytest.mark.parametrize("kind", ["vampprior", "vampprior-data"])
def test_vampprior_is_mean_of_encoder_densities_at_pseudo_inputs(make, kind):
    top = 2 if make is not tiny_one_layer else 3
    images = torch.rand(30, 6)
    prior = VampPrior(top, 6, 5, init_mean=0.5, init_std=0.3) if kind == "vampprior" \
        else VampPriorData(top, 6, 5, images[:5])
    model = make(prior).double()
    z = torch.randn(4, 3, top, dtype=torch.float64)
    u = prior.pseudo_inputs()
    per = torch.stack([separate_top_posterior(model, u[c : c + 1]).log_prob(z) for c in range(u.shape[0])])
    want = torch.logsumexp(per, dim=0) - math.log(u.shape[0])
    torch.testing.assert_close(prior.log_prob(z), want, rtol=1e-12, atol=1e-10)


def test_learned_pseudo_inputs_follow_the_paper_parameterization():
    prior = VampPrior(2, 6, 4, init_mean=0.05, init_std=0.01)
    u = prior.pseudo_inputs()
    # hardtanh to the data range [0, 1] of N(0.05, 0.01) pre-activations
    assert u.min() >= 0 and u.max() <= 1
    assert abs(float(prior.pre_activation.detach().mean()) - 0.05) < 0.01
    with torch.no_grad():
        prior.pre_activation[0, 0] = 3.0
        prior.pre_activation[0, 1] = -3.0
    u = prior.pseudo_inputs().detach()
    assert float(u[0, 0]) == 1.0 and float(u[0, 1]) == 0.0


def test_gradients_reach_pseudo_inputs_and_mixture_parameters():
    x = torch.bernoulli(torch.full((8, 6), 0.4))
    vamp = tiny_hierarchical(VampPrior(2, 6, 4))
    (-bounds.iwae(vamp.log_weights(x, 3)).mean()).backward()
    g = vamp.prior.pre_activation.grad
    assert g is not None and (g.abs().sum(1) > 0).all(), "every pseudo-input gets a gradient"

    mog = tiny_two_layer(MixtureOfGaussians(2, 4, learn_weights=True))
    (-bounds.elbo(mog.log_weights(x, 3)).mean()).backward()
    for name in ("means", "log_vars", "logits"):
        grad = getattr(mog.prior, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_vampprior_data_pseudo_inputs_do_not_move():
    images = torch.rand(5, 6)
    model = tiny_one_layer(VampPriorData(3, 6, 5, images))
    assert all(p is not model.prior.images for p in model.parameters())
    assert "prior.images" in model.state_dict()
    before = model.prior.images.clone()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss = -bounds.iwae(model.log_weights(torch.bernoulli(torch.rand(4, 6)), 4)).mean()
    loss.backward()
    enc_before = model.encoder[0].weight.clone()
    opt.step()
    assert torch.equal(model.prior.images, before)
    assert not torch.equal(model.encoder[0].weight, enc_before)  # the step did move the model


def test_analytic_kl_matches_monte_carlo_for_standard_prior():
    g = torch.Generator().manual_seed(3)
    q = DiagonalGaussian(torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g))
    n = 200_000
    z = q.mean + q.std * torch.randn(n, 3, 5, generator=g, dtype=torch.float32)
    terms = (q.log_prob(z) - StandardNormal(5).log_prob(z)).double()
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(n)
    exact = q.kl_standard().double()
    assert ((mc - exact).abs() < 4 * se).all(), (mc, exact, se)


@pytest.mark.parametrize("name", ["one-layer", "two-layer", "hierarchical"])
def test_single_component_mixture_at_standard_normal_gives_identical_bounds(name):
    base = RunConfig().with_overrides({"model.name": name, "model.hidden": [16], "model.latent_dim": 4,
                                       "model.two_layer.hidden1": [16], "model.two_layer.hidden2": [8],
                                       "model.hierarchical.width": 16})
    std = build_model(base.model, 20)
    mog = build_model(base.with_overrides({"model.prior.name": "mog", "model.prior.components": 1}).model, 20)
    missing = mog.load_state_dict(std.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"prior.means", "prior.log_vars", "prior.logits"}
    with torch.no_grad():
        mog.prior.means.zero_()
        mog.prior.log_vars.zero_()
    x = torch.bernoulli(torch.full((7, 20), 0.3))
    torch.manual_seed(5)
    lw_std = std.log_weights(x, 6)
    torch.manual_seed(5)
    lw_mog = mog.log_weights(x, 6)
    # the same samples and networks; only float32 rounding of ~50-nat sums differs (1 ulp ~ 4e-6)
    torch.testing.assert_close(lw_mog, lw_std, rtol=0, atol=1e-4)
    torch.testing.assert_close(bounds.iwae(lw_mog), bounds.iwae(lw_std), rtol=0, atol=1e-4)


def test_mixture_sampling_follows_learned_weights():
    prior = MixtureOfGaussians(1, 2, learn_weights=True)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-20.0], [20.0]]))
        prior.log_vars.fill_(0.0)
        prior.logits.copy_(torch.log(torch.tensor([0.2, 0.8])))
    n = 20_000
    with torch.no_grad():
        z = prior.sample(n, torch.Generator().manual_seed(0))
    frac = float((z > 0).float().mean())
    assert abs(frac - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)
    # within a component: N(20, 1)
    right = z[z > 0]
    assert abs(float(right.mean()) - 20) < 4 / math.sqrt(right.numel())


def test_vampprior_samples_come_from_encoder_at_pseudo_inputs():
    prior = VampPriorData(2, 6, 1, torch.rand(1, 6))
    model = tiny_hierarchical(prior).double()
    z = prior.sample(40_000, torch.Generator().manual_seed(1))
    q = separate_top_posterior(model, prior.images.double())
    n = z.shape[0]
    assert ((z.mean(0) - q.mean[0]).abs() < 4 * q.std[0] / math.sqrt(n)).all()


def test_log_standard_normal_is_the_standard_prior():
    z = torch.randn(3, 4, 2)
    torch.testing.assert_close(StandardNormal(2).log_prob(z), log_standard_normal(z))


def test_prior_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.prior\.name: unknown prior 'vamprior'.*vampprior"):
        RunConfig().with_overrides({"model.prior.name": "vamprior"})
    with pytest.raises(ConfigError, match=r"model\.name: unknown model"):
        RunConfig().with_overrides({"model.name": "HVAE"})
    with pytest.raises(ConfigError, match=r"model\.prior\.pseudo_inputs_init"):
        RunConfig().with_overrides({"model.prior.pseudo_inputs_init": "zeros"})
    with pytest.raises(ValueError, match=r"model\.prior\.components: asks for 50 training images"):
        build_model(RunConfig().with_overrides({"model.prior.name": "vampprior-data",
                                                "model.prior.components": 50}).model, 6, torch.rand(10, 6))


def test_vampprior_paper_preset():
    cfg = preset("vampprior-paper")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.early_stopping_patience) == \
        (5e-4, 100, 2000, 50)
    assert cfg.objective.warmup_epochs == 100
    assert (cfg.model.name, cfg.model.prior.name, cfg.model.prior.components) == ("hierarchical", "vampprior", 500)
    assert cfg.model.hierarchical.latent_dims == (40, 40) and cfg.model.hierarchical.width == 300
    assert preset("iwae-paper-two-layer").model.two_layer.latent_dims == (100, 50)


def test_copied_model_keeps_its_own_vampprior_encoder():
    import copy

    model = tiny_hierarchical(VampPrior(2, 6, 3))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.q_z2.parameters():
            p.add_(0.5)
    z = torch.randn(4, 2)
    assert not torch.allclose(clone.prior.log_prob(z), model.prior.log_prob(z))


# --- the pseudo-input init follows the dataset, as in the VampPrior code's load_data.py ---

DATASET_INIT = {"mnist": (0.05, 0.01), "mnist-dynamic": (0.05, 0.01), "binarized-mnist": (0.05, 0.01),
                "omniglot": (0.05, 0.01), "omniglot-chardata": (0.05, 0.01),
                "caltech101-silhouettes": (0.5, 0.02), "caltech": (0.5, 0.02),
                "freyfaces": (0.5, 0.02), "frey-grey": (0.5, 0.02)}


@pytest.mark.parametrize("name", sorted(DATASET_INIT))
def test_unset_pseudo_input_init_takes_the_datasets_values(name):
    cfg = RunConfig().with_overrides({"model.prior.name": "vampprior", "data.name": name})
    assert (cfg.model.prior.pseudo_inputs_mean, cfg.model.prior.pseudo_inputs_std) == (None, None)
    resolved = cfg.model.prior.with_pseudo_input_init(pseudo_input_init(cfg.data.name))
    assert (resolved.pseudo_inputs_mean, resolved.pseudo_inputs_std) == DATASET_INIT[name]
    set_here = cfg.with_overrides({"model.prior.pseudo_inputs_mean": -0.05}).model.prior
    set_here = set_here.with_pseudo_input_init(pseudo_input_init(name))
    assert (set_here.pseudo_inputs_mean, set_here.pseudo_inputs_std) == (-0.05, DATASET_INIT[name][1])


@pytest.mark.parametrize(("name", "mean", "std"), [("caltech101-silhouettes", 0.5, 0.02), ("freyfaces", 0.5, 0.02),
                                                   ("binarized-mnist", 0.05, 0.01), ("omniglot", 0.05, 0.01)])
def test_built_pseudo_inputs_start_around_the_datasets_mean(name, mean, std):
    """500 x 784 draws of N(mean, std): the sample mean within 5 standard errors
    (std / sqrt(n): 3.2e-5 for Caltech), the sample std within 5 of its own (std / sqrt(2n))."""
    cfg = RunConfig().with_overrides({"model.prior.name": "vampprior", "data.name": name})
    w = build_model(cfg.model, 784, dataset=name).prior.pre_activation.detach().double()
    n = w.numel()
    assert n == 500 * 784
    assert abs(float(w.mean()) - mean) < 5 * std / math.sqrt(n)
    assert abs(float(w.std()) - std) < 5 * std / math.sqrt(2 * n)


def test_trainer_builds_caltech_pseudo_inputs_around_its_mean(shared_data, tmp_path):
    """The path a run takes: RunState resolves the unset init from data.name (Caltech: 0.5, 0.02)."""
    from elbolab.training import RunState

    cfg = RunConfig().with_overrides({"data.name": "caltech101-silhouettes", "data.data_dir": str(shared_data),
                                      "model.prior.name": "vampprior", "model.prior.components": 50,
                                      "model.hidden": [16], "model.latent_dim": 4, "train.progress": False})
    w = RunState(cfg, tmp_path / "run").model.prior.pre_activation.detach().double()
    assert abs(float(w.mean()) - 0.5) < 5 * 0.02 / math.sqrt(w.numel())
    assert cfg.model.prior.pseudo_inputs_mean is None  # the saved config still says "the dataset's value"
