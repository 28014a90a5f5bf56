"""The gradient SNR diagnostic on the linear-Gaussian model (float64, fixed seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from elbolab.diagnostics.gradient_snr import GradientSNR, gradient_snr, log_log_slope, plot_snr_vs_k, snr_sweep
from elbolab.models.linear_gaussian import LinearGaussian

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def lg():
    model = LinearGaussian(5, 2, seed=0)
    x = 2.0 * torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return model, x


def test_encoder_snr_falls_like_one_over_sqrt_k_for_standard_but_not_for_dreg(lg):
    """Rainforth et al. (2018): standard IWAE encoder SNR ~ k^(-1/2); Tucker et al. (2018): DReG's
    does not fall. Measured slopes on this model (k = 4..256, 200 draws): standard -0.42,
    DReG -0.05 (STL +0.15). Tolerance: standard in [-0.75, -0.3], DReG above -0.2 and at least 0.3 above standard."""
    model, x = lg
    ks = (4, 16, 64, 256)
    slope = {est: log_log_slope(snr_sweep(model, x, ks, [est], n_draws=200, seed=0)) for est in ("standard", "dreg")}
    assert -0.75 < slope["standard"] < -0.3, slope
    assert slope["dreg"] > -0.2, slope
    assert slope["dreg"] - slope["standard"] > 0.3, slope


def test_snr_statistics_match_a_direct_computation(lg):
    """Welford accumulation against mean / std of explicitly stacked gradients on the same draws."""
    from elbolab.objectives import iwae_objective

    model, x = lg
    res = gradient_snr(model, x, 3, "dreg", n_draws=15, seed=5)
    assert all(p.grad is None for p in model.parameters())  # the model is left clean
    grads = []
    with torch.random.fork_rng():
        torch.manual_seed(5)
        for _ in range(15):
            model.zero_grad()
            iwae_objective(model, x, 3, estimator="dreg").loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.encoder_parameters()]))
    g = torch.stack(grads)
    torch.testing.assert_close(res.mean["encoder"], g.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.std["encoder"], g.std(0), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(res.snr("encoder"), g.mean(0).abs() / g.std(0), rtol=1e-8, atol=1e-12)
    assert res.mean["decoder"].numel() == sum(p.numel() for p in model.decoder_parameters())


def test_summary_ignores_dead_elements_and_keeps_infinite_snr():
    r = GradientSNR("iwae", "stl", 1, 10,
                    mean={"encoder": torch.tensor([0.0, 2.0, 1.0]), "decoder": torch.zeros(2)},
                    std={"encoder": torch.tensor([0.0, 1.0, 0.5]), "decoder": torch.zeros(2)})
    assert r.summary("encoder") == pytest.approx(2.0)
    assert math.isnan(r.summary("decoder"))
    r.std["encoder"][1] = 0.0
    assert r.summary("encoder") == math.inf


def test_bad_arguments_are_named(lg):
    model, x = lg
    with pytest.raises(ValueError, match="n_draws"):
        gradient_snr(model, x, 2, n_draws=1)
    with pytest.raises(ValueError, match="objective.estimator"):
        gradient_snr(model, x, 2, estimator="reinforce", n_draws=3)


def test_plot_writes_png(lg, tmp_path):
    model, x = lg
    results = snr_sweep(model, x, (1, 4), n_draws=5)
    out = plot_snr_vs_k(results, tmp_path / "snr.png", title="linear-Gaussian")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r.estimator for r in results} == {"standard", "stl", "dreg"}


def test_group_snr_corrects_the_noise_floor_of_the_mean():
    r = GradientSNR("iwae", "standard", 1, 10,
                    mean={"encoder": torch.tensor([3.0, 4.0]), "decoder": torch.tensor([0.1, 0.0])},
                    std={"encoder": torch.tensor([1.0, 1.0]), "decoder": torch.tensor([1.0, 1.0])})
    # ||m||^2 - tr(cov) / n = 25 - 0.2 over tr(cov) = 2
    assert r.group_snr("encoder") == pytest.approx(math.sqrt(24.8 / 2.0))
    # a mean within its own sampling noise is no signal at all
    assert r.group_snr("decoder") == 0.0
