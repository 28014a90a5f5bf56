"""Each fast path of fastpaths.py against its plain twin and a float64 reference.

Without gradients, ``Tanh`` computes tanh as ``2 sigmoid(2a) - 1``, ``sum_softplus_`` sums
softplus through ``relu(l) - log sigmoid(|l|)`` with products of sigmoids, and the
Bernoulli log-density goes through the decoder's last layer without ``[K, B, D]``
temporaries. Each must agree with float64 to float32 rounding, leave training on torch's
kernels, and move a trained-looking decoder's log p(x, z) by no more than a few roundings
of the result. The allocator setting must not let the heap grow.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from elbolab import fastpaths
from elbolab.config import ModelConfig
from elbolab.distributions import log_bernoulli_logits
from elbolab.evaluation import log_likelihood
from elbolab.fastpaths import log_bernoulli_linear_, sum_softplus_
from elbolab.likelihoods import BernoulliLikelihood, GaussianLikelihood
from elbolab.models import build_model, layers
from elbolab.models.one_layer import OneLayerVAE
from elbolab.priors import StandardNormal

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def sigmoid_form_at_any_size(monkeypatch):
    """Take the sigmoid form of tanh on small test inputs too (it steps aside below 32k)."""
    monkeypatch.setattr(fastpaths, "TANH_SIGMOID_MIN_NUMEL", 0)


# --- tanh -----------------------------------------------------------------------------


def test_tanh_values_within_one_rounding_of_float64() -> None:
    a = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-8, 60.0, -60.0])])
    with torch.no_grad():
        got = fastpaths.Tanh()(a)
    ref = torch.tanh(a.double())
    assert (got.double() - ref).abs().max() <= 2 * EPS32  # absolute: the values lie in [-1, 1]
    assert not torch.equal(got, torch.tanh(a))  # the sigmoid form ran (it rounds differently)
    assert got[-2] == 1.0 and got[-1] == -1.0
    assert torch.isnan(fastpaths.Tanh()(torch.tensor([math.nan]))).all()


def test_training_and_small_inputs_keep_torchs_tanh(monkeypatch) -> None:
    a = torch.randn(300, 200) * 3
    tracked = fastpaths.Tanh()(a.clone().requires_grad_(True))
    assert tracked.grad_fn.name() == "TanhBackward0"
    assert torch.equal(tracked.detach(), torch.tanh(a))
    monkeypatch.setattr(fastpaths, "TANH_SIGMOID_MIN_NUMEL", 1 << 15)
    with torch.no_grad():
        assert torch.equal(fastpaths.Tanh()(a[:20]), torch.tanh(a[:20]))  # 4,000 elements: torch's kernel
        assert not torch.equal(fastpaths.Tanh()(a), torch.tanh(a))  # 60,000: the sigmoid form
    assert isinstance(layers.activation("tanh"), torch.nn.Tanh)  # still a tanh to isinstance checks


# --- sum of softplus --------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 7, 33, 64, 784, 785])
def test_sum_softplus_matches_float64_at_any_width(d: int) -> None:
    torch.manual_seed(d)
    logits = torch.randn(400, d) * 15  # past softplus's linear threshold (20) on both sides
    ref = F.softplus(logits.double()).sum(-1)
    got = sum_softplus_(logits.clone())
    assert got.shape == (400,)
    # rounded relative to sum |l| (see the docstring), with a few roundings per term
    tol = 8 * EPS32 * logits.abs().sum(-1).double().clamp_min(1.0)
    assert ((got.double() - ref).abs() <= tol).all()


def test_sum_softplus_extremes() -> None:
    logits = torch.stack([
        torch.full((784,), -100.0),  # every factor rounds to 1: the sum is 784 e^-100, i.e. 0
        torch.full((784,), 100.0),  # pure relu
        torch.zeros(784),  # every factor 1/2: 2^-32 per product, no underflow
    ])
    got = sum_softplus_(logits.clone())
    assert got[0].abs() < 1e-30
    assert got[1] == pytest.approx(78400.0, rel=EPS32)
    assert got[2] == pytest.approx(784 * math.log(2.0), rel=4 * EPS32)


def test_sum_softplus_overwrites_its_input_and_refuses_nothing_else() -> None:
    logits = torch.randn(3, 10)
    kept = logits.clone()
    sum_softplus_(logits)
    assert not torch.equal(logits, kept)  # documented: the buffer is scratch


def _trained_looking_decoder() -> OneLayerVAE:
    """A 784-pixel decoder whose logits look like a trained MNIST model's: mostly -5..-15
    (background), some strongly positive (strokes)."""
    torch.manual_seed(0)
    model = OneLayerVAE(784, 10, (64, 64), "tanh", "bernoulli", StandardNormal(10))
    with torch.no_grad():
        out = model.likelihood.head
        out.weight.mul_(6.0)
        out.bias.copy_(torch.where(torch.rand(784) < 0.15, 6.0, -9.0))
    return model.eval()


def test_decoder_log_joint_as_close_to_float64_as_torch_float32_path(monkeypatch) -> None:
    """The model-level claim: log p(x, z) from the fast float32 path is within float32
    rounding of the float64 value, as the plain float32 path (nn.Tanh, F.softplus) is."""
    model = _trained_looking_decoder()
    x = torch.bernoulli(torch.full((20, 784), 0.15))
    z = torch.randn(50, 20, 10)
    with torch.no_grad():
        logits = model.decode(z)
        assert (logits < -5).float().mean() > 0.5 and logits.max() > 8
        ref = model.double().log_joint(x.double(), z.double())
        model.float()
        fast = model.log_joint(x, z)
        monkeypatch.setattr(fastpaths, "_tanh_from_sigmoid", torch.tanh)
        monkeypatch.setattr(BernoulliLikelihood, "log_prob_from_features", _general)
        plain = model.log_joint(x, z)
    # errors in units of float32's relative rounding of the result (about one ulp of log p)
    ulps_fast = (fast.double() - ref).abs() / (EPS32 * ref.abs())
    ulps_plain = (plain.double() - ref).abs() / (EPS32 * ref.abs())
    assert ulps_plain.max() > 0  # float32 rounding is visible at this size
    # sum relu(l) from (sum l + sum |l|) / 2 is rounded at the size of sum |l|: about one
    # ulp of log p on average, three times torch's own path, never past a few ulps
    assert ulps_fast.mean() <= 2.0 and ulps_fast.max() <= 8.0
    assert ulps_fast.mean() <= 5 * ulps_plain.mean()


# --- the allocator setting ------------------------------------------------------------------


def test_retain_freed_memory_opt_out_and_idempotence(monkeypatch) -> None:
    allocator = fastpaths
    monkeypatch.setattr(allocator, "_retained", False)
    monkeypatch.setenv("ELBOLAB_RETAIN_FREED_MEMORY", "0")
    assert allocator.retain_freed_memory() is False
    calls = []
    monkeypatch.delenv("ELBOLAB_RETAIN_FREED_MEMORY")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("C", (), {
        "mallopt": staticmethod(lambda p, v: calls.append((p, v)) or 1)})())
    assert allocator.retain_freed_memory() is True
    assert calls == [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)]
    assert allocator.retain_freed_memory() is True and len(calls) == 2  # once per process
    monkeypatch.setattr(allocator, "_retained", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("C", (), {})())  # no mallopt (not glibc)
    assert allocator.retain_freed_memory() is False


_FRAGMENTATION = """
import resource, torch
from elbolab import fastpaths
assert fastpaths.retain_freed_memory()
torch.set_num_threads(1)
z = torch.randn(60000, 2, dtype=torch.float64)
outs = []
for i in range(40):  # ELBO surgery's pattern: 134 MB temporaries, small results kept between them
    quad = z[:279] @ z.T
    quad = quad + 1.0
    outs.append(torch.logsumexp(quad, dim=-1))
    if i == 9:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow  # allocates and frees large temporaries for about 18 CPU seconds
def test_retained_memory_does_not_grow_with_large_temporaries() -> None:
    """With an mmap threshold of 1 GiB this pattern grows the heap by a chunk per iteration;
    large blocks must still be returned so that the peak stops growing."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRAGMENTATION], capture_output=True, text=True, check=True)
    after_10, after_40 = (int(v) for v in out.stdout.split()[-2:])
    assert after_40 - after_10 < 400, f"peak RSS grew from {after_10} MB to {after_40} MB over 30 chunks"


# --- the Bernoulli log-density through the last layer -------------------------------------------


def _general(self, x, features):
    """The plain twin of the Bernoulli fast path."""
    return self.log_prob(x, self.head(features))


def _layer_and_features(k: int = 30, b: int = 7, h: int = 20, d: int = 40, scale: float = 3.0):
    """Logits spanning about -60..60, past softplus's threshold of 20 on both sides."""
    layer = torch.nn.Linear(h, d)
    with torch.no_grad():
        layer.weight.mul_(scale * 4)
        layer.bias.uniform_(-5, 5)
    features = torch.randn(k, b, h).tanh() * scale
    return layer, features


@pytest.mark.parametrize("grey", [False, True])
def test_fast_path_matches_float64_reference(grey: bool) -> None:
    layer, features = _layer_and_features()
    x = torch.rand(7, 40) if grey else torch.bernoulli(torch.full((7, 40), 0.3))
    with torch.no_grad():
        logits = layer(features)
        assert logits.abs().max() > 20 and logits.min() < -20  # both softplus branches taken
        general = log_bernoulli_logits(x, logits)
        fast = log_bernoulli_linear_(x, features, layer.weight, layer.bias)
        ref = log_bernoulli_logits(
            x.double(), torch.nn.functional.linear(features.double(), layer.weight.double(), layer.bias.double())
        )
    assert fast.shape == ref.shape == (30, 7)
    # float32 rounding of a sum of 40 terms of size ~60: both forms are within a few ulps of the total
    tol = 64 * torch.finfo(torch.float32).eps * ref.abs().clamp_min(1.0)
    assert ((general.double() - ref).abs() <= tol).all()
    assert ((fast.double() - ref).abs() <= tol).all()


def test_fast_path_refuses_gradients_and_likelihood_falls_back() -> None:
    layer, features = _layer_and_features()
    x = torch.bernoulli(torch.full((7, 40), 0.5))
    with pytest.raises(ValueError, match="no gradient"):
        log_bernoulli_linear_(x, features, layer.weight, layer.bias)
    # with gradients on, the likelihood takes the general path and its gradient is the general one
    lik = BernoulliLikelihood(40, 20)
    lik.head = layer
    got = lik.log_prob_from_features(x, features).sum()
    (g_got,) = torch.autograd.grad(got, layer.weight)
    want = log_bernoulli_logits(x, layer(features)).sum()
    (g_want,) = torch.autograd.grad(want, layer.weight)
    assert torch.equal(g_got, g_want)


def test_other_likelihoods_apply_the_layer() -> None:
    lik = GaussianLikelihood(4, 5)
    features = torch.randn(3, 2, 5)
    x = torch.rand(2, 4)
    with torch.no_grad():
        assert torch.equal(lik.log_prob_from_features(x, features), lik.log_prob(x, lik.head(features)))


@pytest.mark.parametrize("name", ["one-layer", "two-layer", "hierarchical"])
def test_models_log_weights_equal_general_path_on_same_draws(name: str, monkeypatch, one_thread) -> None:
    cfg = ModelConfig(name=name, latent_dim=6, hidden=(16, 16))
    data = torch.bernoulli(torch.full((64, 784), 0.2))
    model = build_model(cfg, 784, data).eval()
    x = data[:5]
    with torch.inference_mode():
        torch.manual_seed(1)
        fast = model.log_weights(x, 40)
        monkeypatch.setattr(BernoulliLikelihood, "log_prob_from_features", _general)
        torch.manual_seed(1)
        general = model.log_weights(x, 40)
    assert fast.shape == (40, 5)
    assert torch.allclose(fast, general, rtol=2e-6, atol=1e-4)
    assert not torch.equal(fast, general[torch.randperm(40)])  # the comparison can tell draws apart


def test_is_log_likelihood_unchanged_by_fast_path(monkeypatch, one_thread) -> None:
    """The whole estimator: same seed, same draws, estimates equal to float32 rounding."""
    data = torch.bernoulli(torch.full((64, 784), 0.2))
    model = build_model(ModelConfig(latent_dim=8, hidden=(32, 32)), 784, data)
    fast = log_likelihood(model, data[:6], k=300, batch_size=4, chunk_size=70, seed=3).per_point
    monkeypatch.setattr(BernoulliLikelihood, "log_prob_from_features", _general)
    general = log_likelihood(model, data[:6], k=300, batch_size=4, chunk_size=70, seed=3).per_point
    assert (fast - general).abs().max() < 1e-6 * general.abs().max()
