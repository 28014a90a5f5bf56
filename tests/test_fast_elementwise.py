"""The two elementwise rewrites behind the faster log weights, against float64 references.

``layers.Tanh`` computes tanh as ``2 sigmoid(2a) - 1`` and ``sum_softplus_`` sums
softplus through ``relu(l) - log sigmoid(|l|)`` with products of sigmoids. Both must
agree with float64 to float32 rounding, keep tanh's gradient, and move a trained-looking
decoder's log p(x, z) by no more than a few roundings of the result.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from elbolab import distributions
from elbolab.distributions import log_bernoulli_logits, sum_softplus_
from elbolab.likelihoods import BernoulliLikelihood
from elbolab.models import layers
from elbolab.models.one_layer import OneLayerVAE
from elbolab.priors import StandardNormal

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def always_fused(monkeypatch):
    """Take the fast paths at any size (they step aside for small tensors by default)."""
    monkeypatch.setattr(distributions, "FUSED_MIN_NUMEL", 0)


def test_small_tensors_take_torchs_kernels(monkeypatch) -> None:
    monkeypatch.setattr(distributions, "FUSED_MIN_NUMEL", 1 << 15)
    small = torch.randn(20, 200, requires_grad=True)
    assert layers.Tanh()(small).grad_fn.name() == "TanhBackward0"
    big = torch.randn(200, 200, requires_grad=True)
    assert "Tanh" in type(layers.Tanh()(big).grad_fn).__name__ and layers.Tanh()(big).grad_fn.name() != "TanhBackward0"
    x = torch.rand(20, 784)
    assert log_bernoulli_logits(x, torch.randn(1, 20, 784, requires_grad=True)).grad_fn.name() == "SubBackward0"
    assert "Bernoulli" in type(log_bernoulli_logits(x, torch.randn(5, 20, 784, requires_grad=True)).grad_fn).__name__


# --- tanh -----------------------------------------------------------------------------


def test_tanh_values_within_one_rounding_of_float64() -> None:
    a = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-8, 60.0, -60.0])])
    got = layers.Tanh()(a)
    ref = torch.tanh(a.double())
    assert (got.double() - ref).abs().max() <= 2 * EPS32  # absolute: the values lie in [-1, 1]
    assert got[-2] == 1.0 and got[-1] == -1.0
    assert torch.isnan(layers.Tanh()(torch.tensor([math.nan]))).all()


def test_tanh_gradient_is_tanh_gradient() -> None:
    a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layers.Tanh(), (a,))
    x = (torch.randn(300, 40) * 3).requires_grad_(True)
    g = torch.randn(300, 40)
    (got,) = torch.autograd.grad(layers.Tanh()(x), x, g)
    want = g.double() * (1 - torch.tanh(x.detach().double()) ** 2)
    assert (got.double() - want).abs().max() <= 8 * EPS32 * g.abs().max()


def test_tanh_same_values_with_and_without_gradient() -> None:
    a = torch.randn(50, 30) * 4
    with torch.no_grad():
        plain = layers.Tanh()(a)
    tracked = layers.Tanh()(a.clone().requires_grad_(True))
    assert tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())
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
    model = OneLayerVAE(784, 10, (64, 64), "tanh", BernoulliLikelihood(), StandardNormal(10))
    with torch.no_grad():
        out = model.decoder[-1]
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
        monkeypatch.setattr(layers, "_tanh_from_sigmoid", torch.tanh)
        monkeypatch.setattr(
            BernoulliLikelihood, "log_prob_linear", lambda self, x, f, layer: self.log_prob(x, layer(f))
        )
        plain = model.log_joint(x, z)
    # errors in units of float32's relative rounding of the result (about one ulp of log p)
    ulps_fast = (fast.double() - ref).abs() / (EPS32 * ref.abs())
    ulps_plain = (plain.double() - ref).abs() / (EPS32 * ref.abs())
    assert ulps_plain.max() > 0  # float32 rounding is visible at this size
    # sum relu(l) from (sum l + sum |l|) / 2 is rounded at the size of sum |l|: about one
    # ulp of log p on average, three times torch's own path, never past a few ulps
    assert ulps_fast.mean() <= 2.0 and ulps_fast.max() <= 8.0
    assert ulps_fast.mean() <= 5 * ulps_plain.mean()


# --- the Bernoulli log-density with a gradient (training) ----------------------------------


def _plain_bernoulli(x, logits):
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


def test_bernoulli_gradient_path_is_exact_in_float64() -> None:
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((4, 9), 0.3)).double()
    logits = (torch.randn(3, 4, 9, dtype=torch.float64) * 12).requires_grad_(True)
    got = log_bernoulli_logits(x, logits)
    assert got.grad_fn is not None and "Bernoulli" in type(got.grad_fn).__name__  # the fused step ran
    # against softplus without F.softplus's cut-off at 20 (which drops log1p(e^-20) = 2e-9)
    exact = (x * logits).sum(-1) - torch.logaddexp(torch.zeros(()).double(), logits).sum(-1)
    assert torch.allclose(got, exact, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda lg: log_bernoulli_logits(x, lg), (logits,))
    # x broadcast the other way round: one logit row scored against K images
    x3 = torch.bernoulli(torch.full((3, 4, 9), 0.3)).double()
    row = (torch.randn(4, 9, dtype=torch.float64) * 12).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lg: log_bernoulli_logits(x3, lg), (row,))


def test_bernoulli_gradient_path_matches_autograd_in_float32() -> None:
    torch.manual_seed(1)
    x = torch.rand(30, 784)  # grey levels too
    logits = (torch.randn(20, 30, 784) * 8).requires_grad_(True)
    g = torch.randn(20, 30)
    fast = log_bernoulli_logits(x, logits)
    (g_fast,) = torch.autograd.grad(fast, logits, g)
    plain = _plain_bernoulli(x, logits)
    (g_plain,) = torch.autograd.grad(plain, logits, g)
    ref = _plain_bernoulli(x.double(), logits.detach().double())
    assert ((fast.detach().double() - ref).abs() <= 8 * EPS32 * logits.detach().abs().sum(-1)).all()
    assert torch.allclose(g_fast, g_plain, rtol=1e-6, atol=1e-6)  # both are g * (x - sigmoid(l))


def test_iwae_gradients_unchanged_by_fast_paths(monkeypatch) -> None:
    """A whole training gradient (IWAE k = 10): the fused Bernoulli step and sigmoid-tanh
    land as near the float64 gradient as autograd through F.softplus and torch.tanh."""
    model = _trained_looking_decoder().train()
    x = torch.bernoulli(torch.full((16, 784), 0.15))

    def grads(m, data):
        torch.manual_seed(5)
        z_noise = torch.randn(10, 16, 10, dtype=torch.float64).to(data.dtype)
        with monkeypatch.context() as mp:
            mp.setattr(torch, "randn", lambda *a, **k: z_noise)  # the same draws in both precisions
            loss = -torch.logsumexp(m.log_weights(data, 10), 0).mean()
        return [g.double() for g in torch.autograd.grad(loss, list(m.parameters()))]

    fast = grads(model, x)
    ref = grads(copy.deepcopy(model).double(), x.double())
    monkeypatch.setattr(layers, "_TanhFunction", type("T", (), {"apply": staticmethod(torch.tanh)}))
    monkeypatch.setattr(distributions, "_BernoulliLogits",
                        type("B", (), {"apply": staticmethod(lambda x, lg: (_plain_bernoulli(x, lg), None))}))
    plain = grads(model, x)
    err_fast = sum(float((a - r).abs().sum()) for a, r in zip(fast, ref, strict=True))
    err_plain = sum(float((b - r).abs().sum()) for b, r in zip(plain, ref, strict=True))
    scale = sum(float(r.abs().sum()) for r in ref)
    assert 0 < err_plain < 1e-4 * scale
    assert err_fast <= 3 * err_plain


# --- the allocator setting ------------------------------------------------------------------


def test_retain_freed_memory_opt_out_and_idempotence(monkeypatch) -> None:
    from elbolab import allocator

    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("ELBOLAB_RETAIN_FREED_MEMORY", "0")
    assert allocator.retain_freed_memory() is False
    calls = []
    monkeypatch.delenv("ELBOLAB_RETAIN_FREED_MEMORY")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("C", (), {
        "mallopt": staticmethod(lambda p, v: calls.append((p, v)) or 1)})())
    assert allocator.retain_freed_memory() is True
    assert calls == [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)]
    assert allocator.retain_freed_memory() is True and len(calls) == 2  # once per process
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("C", (), {})())  # no mallopt (not glibc)
    assert allocator.retain_freed_memory() is False
