"""Bounds against float64 references, on random and extreme log weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elbolab import bounds


def ref_iwae(lw: np.ndarray) -> np.ndarray:
    m = lw.max(0)
    return m + np.log(np.exp(lw - m).mean(0))


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
@pytest.mark.parametrize("k", [1, 2, 7, 1000])
def test_iwae_and_elbo_match_float64_reference(scale: float, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    lw = torch.randn(k, 13, generator=g, dtype=torch.float64) * scale - 3 * scale
    np_lw = lw.numpy()
    np.testing.assert_allclose(bounds.iwae(lw).numpy(), ref_iwae(np_lw), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(bounds.elbo(lw).numpy(), np_lw.mean(0), rtol=1e-12)
    # float32 inputs of magnitude 1e4 stay finite and within float32 rounding
    f32 = bounds.iwae(lw.float())
    assert torch.isfinite(f32).all()
    np.testing.assert_allclose(f32.double().numpy(), ref_iwae(np_lw), rtol=1e-6, atol=1e-3 * scale / 1e3 + 1e-4)


def test_k1_iwae_equals_elbo_exactly() -> None:
    lw = torch.randn(1, 50) * 1e4
    assert torch.equal(bounds.iwae(lw), bounds.elbo(lw))
    assert torch.equal(bounds.iwae(lw), lw[0])


def test_iwae_at_least_elbo_and_at_most_max() -> None:
    lw = torch.randn(64, 32, dtype=torch.float64) * 5
    assert (bounds.iwae(lw) >= bounds.elbo(lw)).all()  # Jensen
    assert (bounds.iwae(lw) <= lw.max(0).values).all()


def test_equal_weights_give_that_weight_and_full_ess() -> None:
    lw = torch.full((10, 3), -1234.5, dtype=torch.float64)
    torch.testing.assert_close(bounds.iwae(lw), torch.full((3,), -1234.5, dtype=torch.float64))
    torch.testing.assert_close(bounds.effective_sample_size(lw), torch.full((3,), 10.0, dtype=torch.float64))


def test_normalized_weights_and_ess_against_reference() -> None:
    lw = torch.tensor([[0.0, 1e4], [math.log(3.0), 1e4 - 50], [-1e4, 1e4 + 1]], dtype=torch.float64)
    w = bounds.normalized_weights(lw)
    torch.testing.assert_close(w.sum(0), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(w[:, 0], torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    ess = bounds.effective_sample_size(lw)
    assert ess[0].item() == pytest.approx(1.0 / (0.25**2 + 0.75**2))
    expected = 1.0 / (w[:, 1] ** 2).sum()
    assert ess[1].item() == pytest.approx(expected.item())
    assert ((ess >= 1.0) & (ess <= 3.0)).all()


def test_iwae_gradient_is_the_normalized_weight_weighted_gradient() -> None:
    """d L_K / d theta = sum_k w~_k d log w_k / d theta, checked on a parametric log weight."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)  # [K, B, P]
    lw = (feats * theta).sum(-1) - 0.5 * (feats**2 * theta**2).sum(-1)
    (grad_autograd,) = torch.autograd.grad(bounds.iwae(lw).sum(), theta)
    w = torch.softmax(lw.detach(), 0)
    dlw = feats - feats**2 * theta.detach()  # d log w / d theta, [K, B, P]
    grad_explicit = (w.unsqueeze(-1) * dlw).sum((0, 1))
    torch.testing.assert_close(grad_autograd, grad_explicit, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(0, 4), torch.zeros(4, 0), torch.zeros(2, 2, 2)])
def test_bad_shapes_are_rejected_with_a_clear_error(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\[K, B\]|K >= 1"):
        bounds.iwae(bad)


def test_integer_log_weights_rejected() -> None:
    with pytest.raises(TypeError, match="floating"):
        bounds.elbo(torch.zeros(2, 2, dtype=torch.int64))
