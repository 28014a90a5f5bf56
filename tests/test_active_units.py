"""Active units against their definition, A_u = Cov_x(E_q(u|x)[u]).

The second-sampled layer's mean E_q[u|x] is an integral over the first layer's draw; with
a one-dimensional first layer it is computed here by Gauss-Hermite quadrature (converged
to ~1e-8), so the Monte Carlo estimator is checked against an exact reference over seeds,
and the plug-in mu(E_q[first layer]) is shown to be off by many standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elbolab.diagnostics import active_units
from elbolab.models import HierarchicalVAE, OneLayerVAE, TwoLayerVAE
from elbolab.priors import StandardNormal

pytestmark = pytest.mark.usefixtures("one_thread")

N = 200
SEEDS = 100


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.bernoulli(torch.full((N, 6), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(0))


def two_layer() -> TwoLayerVAE:
    """z1 one-dimensional with unit-scale posterior spread, mu2 = tanh network made steep:
    E_q[mu2(z1)] differs clearly from mu2(E_q[z1])."""
    torch.manual_seed(0)
    model = TwoLayerVAE(6, (1, 2), (5,), (4,), "tanh", "bernoulli", StandardNormal(2)).double()
    with torch.no_grad():
        head = model.q_z1.head.linear  # rows: mean, log-variance
        head.weight[0].mul_(3.0)
        head.weight[1].zero_()
        head.bias[1].fill_(-0.5)
        model.q_z2.body[0].weight.mul_(3.0)
    return model


def hierarchical() -> HierarchicalVAE:
    """z2 one-dimensional with standard-deviation-1 posteriors; q(z1|x, z2)'s z2 branch steepened."""
    torch.manual_seed(0)
    model = HierarchicalVAE(6, (2, 1), 5, (-6.0, 2.0), "bernoulli", StandardNormal(1)).double()
    with torch.no_grad():
        head = model.q_z2.head.linear
        head.weight[1].zero_()
        head.bias[1].fill_(0.0)
        model.q_z1.body.b.h.weight.mul_(2.0)
        model.q_z1.body.b.g.weight.mul_(2.0)
    return model


# (builder, index of the layer sampled second, its conditional mean given x and draws z [Q, B, 1])
MODELS = {
    "two_layer": (two_layer, 1, lambda m, x, z: m.q_z2(z)[0]),
    "hierarchical": (hierarchical, 0, lambda m, x, z: m.q_z1(x, z)[0]),
}
#: the plug-in's activity over the definition's, largest over units (quoted in docs/diagnostics.md)
PLUG_IN_RATIO = {"two_layer": 2.02, "hierarchical": 1.64}


@torch.no_grad()
def quadrature(model, upper_mean, x, nodes: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """E_q[u|x] and Var_q(mu(u-layer)|x), ``[N, D]``, by Gauss-Hermite over the 1-D first layer."""
    t, w = np.polynomial.hermite_e.hermegauss(nodes)
    t, w = torch.tensor(t), torch.tensor(w / w.sum())
    q = model.posterior(x)
    mu = upper_mean(model, x, q.mean + q.std * t[:, None, None])  # [Q, N, D]
    mean = (w[:, None, None] * mu).sum(0)
    return mean, (w[:, None, None] * mu.pow(2)).sum(0) - mean.pow(2)


@pytest.mark.parametrize("name", MODELS)
def test_definition_is_unbiased_and_the_plug_in_is_not(name, x):
    build, layer, upper_mean = MODELS[name]
    model = build()
    mean, within = quadrature(model, upper_mean, x)
    assert (mean - quadrature(model, upper_mean, x, 160)[0]).abs().max() < 1e-7  # converged
    reference = mean.var(0)  # Cov_x of the exact E_q[u|x], dividing by N - 1
    with torch.no_grad():
        plug_in = upper_mean(model, x, model.posterior(x).mean).var(0)
    assert (plug_in / reference).max().item() == pytest.approx(PLUG_IN_RATIO[name], abs=0.005)
    for samples in (2, 64):
        runs = [active_units(model, x, samples=samples, seed=s) for s in range(SEEDS)]
        acts = torch.stack([r.activity[layer] for r in runs])
        se = acts.std(0) / math.sqrt(SEEDS)
        z = (acts.mean(0) - reference) / se
        assert z.abs().max() < 4, (samples, acts.mean(0), reference, se)
        # today's plug-in and the naive variance of the K-draw average both fail by far
        assert ((plug_in - reference).abs() / se).max() > 20, (samples, plug_in, reference, se)
        assert (within.mean(0) / samples / se).max() > 10
        assert all(r.samples == samples and r.method == "definition" for r in runs)
        if samples > 2:  # the reported Monte Carlo error matches the spread over seeds
            reported = torch.stack([r.mc_stderr[layer] for r in runs]).mean(0)
            ratio = reported / acts.std(0)
            assert ((ratio > 0.75) & (ratio < 1.33)).all(), ratio
            assert torch.stack([r.mc_stderr[1 - layer] for r in runs]).eq(0).all()  # the exact layer
        else:
            assert runs[0].mc_stderr is None  # one draw per half: no within-half spread
    # the first-sampled layer's mean is exact: identical in every run, no Monte Carlo
    with torch.no_grad():
        exact = model.posterior(x).mean.var(0)
    torch.testing.assert_close(runs[0].activity[1 - layer], exact, rtol=1e-12, atol=0)
    torch.testing.assert_close(runs[1].activity[1 - layer], runs[0].activity[1 - layer], rtol=0, atol=0)


def test_iwae_code_method_is_the_variance_at_one_draw(x):
    """The authors' code: mu2 at one z1 ~ q(z1|x), np.var over points. Its expectation is
    (N-1)/N (Cov_x(E[u|x]) + mean_x Var_q(mu2|x)): larger than the definition."""
    model = two_layer()
    _, layer, upper_mean = MODELS["two_layer"]
    mean, within = quadrature(model, upper_mean, x)
    expected = (N - 1) / N * (mean.var(0) + within.mean(0))
    runs = [active_units(model, x, method="iwae-code", seed=s) for s in range(SEEDS)]
    acts = torch.stack([r.activity[layer] for r in runs])
    se = acts.std(0) / math.sqrt(SEEDS)
    assert ((acts.mean(0) - expected).abs() / se).max() < 4, (acts.mean(0), expected, se)
    assert ((acts.mean(0) - mean.var(0)) / se).min() > 20
    with torch.no_grad():
        m1 = model.posterior(x).mean
    torch.testing.assert_close(runs[0].activity[0], m1.var(0, unbiased=False), rtol=1e-12, atol=0)
    assert runs[0].samples == 1 and runs[0].mc_stderr is None and runs[0].method == "iwae-code"


def test_one_layer_is_exact_and_draws_nothing(x):
    model = OneLayerVAE(6, 3, (5,), "tanh", "bernoulli", StandardNormal(3)).double()
    with torch.no_grad():
        exact = model.posterior(x).mean.var(0)
    state = torch.get_rng_state()
    a = active_units(model, x, seed=0, batch_size=7)
    b = active_units(model, x, seed=1, samples=2, batch_size=1000)
    torch.testing.assert_close(a.activity[0], exact, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.activity[0], a.activity[0], rtol=1e-12, atol=0)
    assert a.samples == 0 and a.mc_stderr[0].eq(0).all()
    assert torch.equal(torch.get_rng_state(), state)
    assert a.counts == [int((exact > 0.01).sum())]


def test_seeded_and_the_callers_rng_untouched(x):
    model = two_layer()
    state = torch.get_rng_state()
    a, b = active_units(model, x, seed=3), active_units(model, x, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.activity, b.activity, strict=True))
    c = active_units(model, x, seed=4)
    assert not torch.equal(a.activity[1], c.activity[1])


class CountingModel(torch.nn.Module):
    """Draw j of point i is the fixed number sin(1 + 0.37 j + 1.3 i)^3 + x_i, numbered in
    call order: chunking must not change the result, which is checked by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.drawn = 0

    def conditional_means(self, x: torch.Tensor, k: int) -> list[torch.Tensor]:
        j = torch.arange(self.drawn, self.drawn + k, dtype=torch.float64)[:, None, None]
        i = torch.arange(x.shape[0], dtype=torch.float64)[None, :, None]
        self.drawn += k
        return [x[:, :2], torch.sin(1 + 0.37 * j + 1.3 * i).pow(3) + x[:, :1]]


def test_chunks_and_halves_by_hand():
    x = torch.linspace(0, 1, 12, dtype=torch.float64).reshape(6, 2)
    results = []
    for chunk in (1, 3, 100):
        model = CountingModel()
        results.append(active_units(model, x, samples=10, chunk_size=chunk, batch_size=6))
        assert model.drawn == 10
    draws = CountingModel().conditional_means(x, 10)[1][:, :, 0].numpy()  # [10, 6]
    a, b = draws[:5].mean(0), draws[5:].mean(0)
    va, vb = draws[:5].var(0, ddof=1) / 5, draws[5:].var(0, ddof=1) / 5
    cov = ((a - a.mean()) * (b - b.mean())).sum() / 5
    var_mc = (((b - b.mean()) ** 2 * va + (a - a.mean()) ** 2 * vb - va * vb).sum()) / 25
    for r in results:
        assert r.activity[1].item() == pytest.approx(cov, rel=1e-12)
        assert r.mc_stderr[1].item() == pytest.approx(math.sqrt(var_mc), rel=1e-12)
        torch.testing.assert_close(r.activity[0], x.var(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "plug-in"}, "method must be one of"),
    ({"samples": 3}, "samples must be an even number"),
    ({"chunk_size": 0}, "chunk_size must be >= 1"),
])
def test_bad_options_are_one_line_errors(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        active_units(two_layer(), x, **kwargs)
