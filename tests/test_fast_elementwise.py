"""The two elementwise rewrites behind the faster log weights, against float64 references.

Without gradients, ``layers.Tanh`` computes tanh as ``2 sigmoid(2a) - 1`` and
``sum_softplus_`` sums softplus through ``relu(l) - log sigmoid(|l|)`` with products of
sigmoids. Both must agree with float64 to float32 rounding, leave training on torch's
kernels, and move a trained-looking decoder's log p(x, z) by no more than a few
roundings of the result.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from elbolab.distributions import sum_softplus_
from elbolab.likelihoods import BernoulliLikelihood
from elbolab.models import layers
from elbolab.models.one_layer import OneLayerVAE
from elbolab.priors import StandardNormal

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def sigmoid_form_at_any_size(monkeypatch):
    """Take the sigmoid form of tanh on small test inputs too (it steps aside below 32k)."""
    monkeypatch.setattr(layers, "TANH_SIGMOID_MIN_NUMEL", 0)


# --- tanh -----------------------------------------------------------------------------


def test_tanh_values_within_one_rounding_of_float64() -> None:
    a = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-8, 60.0, -60.0])])
    with torch.no_grad():
        got = layers.Tanh()(a)
    ref = torch.tanh(a.double())
    assert (got.double() - ref).abs().max() <= 2 * EPS32  # absolute: the values lie in [-1, 1]
    assert not torch.equal(got, torch.tanh(a))  # the sigmoid form ran (it rounds differently)
    assert got[-2] == 1.0 and got[-1] == -1.0
    assert torch.isnan(layers.Tanh()(torch.tensor([math.nan]))).all()


def test_training_and_small_inputs_keep_torchs_tanh(monkeypatch) -> None:
    a = torch.randn(300, 200) * 3
    tracked = layers.Tanh()(a.clone().requires_grad_(True))
    assert tracked.grad_fn.name() == "TanhBackward0"
    assert torch.equal(tracked.detach(), torch.tanh(a))
    monkeypatch.setattr(layers, "TANH_SIGMOID_MIN_NUMEL", 1 << 15)
    with torch.no_grad():
        assert torch.equal(layers.Tanh()(a[:20]), torch.tanh(a[:20]))  # 4,000 elements: torch's kernel
        assert not torch.equal(layers.Tanh()(a), torch.tanh(a))  # 60,000: the sigmoid form
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


_FRAGMENTATION = """
import resource, torch
from elbolab import allocator
assert allocator.retain_freed_memory()
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


def test_retained_memory_does_not_grow_with_large_temporaries() -> None:
    """With the mmap threshold at 1 GiB this pattern grew the heap to 4.5 GB (a chunk per
    iteration); large blocks must still be returned so that the peak stops growing."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRAGMENTATION], capture_output=True, text=True, check=True)
    after_10, after_40 = (int(v) for v in out.stdout.split()[-2:])
    assert after_40 - after_10 < 400, f"peak RSS grew from {after_10} MB to {after_40} MB over 30 chunks"
