"""IS log-likelihood and bound-versus-K: exact against replayed weights and the linear-Gaussian model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _diag_models import ReplayModel, data_from, orthogonal_linear_gaussian

from elbolab.diagnostics.bound_vs_k import bound_vs_k, group_bounds
from elbolab.evaluation import log_likelihood
from elbolab.models.linear_gaussian import LinearGaussian


def _replay_table(k: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    # magnitudes where exp() underflows in float64: only a float64 log-sum-exp survives
    return -1e4 + 40.0 * torch.randn(k, n, generator=g, dtype=torch.float64)


def _points(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, 3).clone()


@pytest.mark.parametrize("batch_size,chunk_size", [(1, 1), (3, 7), (5, 64), (100, 1000)])
def test_log_likelihood_is_one_logsumexp_whatever_the_chunking(batch_size, chunk_size):
    k, n = 1000, 10
    table = _replay_table(k, n)
    expected = torch.logsumexp(table, 0) - math.log(k)
    res = log_likelihood(ReplayModel(table), _points(n), k=k, batch_size=batch_size, chunk_size=chunk_size)
    assert torch.allclose(res.per_point, expected, rtol=0, atol=1e-9)
    assert res.mean == pytest.approx(float(expected.mean()), abs=1e-9)
    assert res.stderr == pytest.approx(float(expected.std() / math.sqrt(n)), rel=1e-9)


def test_log_likelihood_is_exact_when_q_is_the_posterior():
    # with q = p(z|x) every weight equals p(x), so L_K = log p(x) for any draw
    model = orthogonal_linear_gaussian(6, 3)
    x = data_from(model, 30)
    res = log_likelihood(model, x, k=37, batch_size=8, chunk_size=5)
    assert torch.allclose(res.per_point, model.log_marginal(x).detach(), rtol=0, atol=1e-9)


def test_log_likelihood_closes_the_gap_on_a_mismatched_q():
    model = orthogonal_linear_gaussian(5, 2, seed=2)
    with torch.no_grad():  # q: the posterior shifted by 0.3 and 50% too wide
        model.c.add_(0.3)
        model.q_log_var.add_(math.log(1.5))
    x = data_from(model, 40, seed=1)
    with torch.no_grad():
        log_p = float(model.log_marginal(x).mean())
        elbo = float(model.elbo_closed_form(x).mean())
    ll = log_likelihood(model, x, k=2000, batch_size=40, chunk_size=300)
    # Monte Carlo error of the mean: delta method, sd(L_K) ~ sd(w / mean w) / sqrt(K) per point
    with torch.no_grad():
        w = torch.softmax(model.log_weights(x, 2000), 0) * 2000
    mc_se = float((w.var(0) / 2000).sum().sqrt() / x.shape[0])
    # a lower bound in expectation; at K = 2000 it has closed >98% of the ELBO's gap
    assert ll.mean <= log_p + 4 * mc_se
    assert log_p - ll.mean < 0.02 * (log_p - elbo)


def test_log_likelihood_is_seeded_and_leaves_the_callers_rng_alone():
    model = LinearGaussian(5, 2, seed=2)
    x = data_from(model, 7)
    state = torch.get_rng_state()
    a = log_likelihood(model, x, k=50, seed=11).per_point
    assert torch.equal(torch.get_rng_state(), state)
    b = log_likelihood(model, x, k=50, seed=11).per_point
    c = log_likelihood(model, x, k=50, seed=12).per_point
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_log_likelihood_rejects_bad_input():
    model = LinearGaussian(5, 2)
    with pytest.raises(ValueError, match="k must be"):
        log_likelihood(model, torch.zeros(2, 5), k=0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        log_likelihood(model, torch.zeros(5), k=3)


def test_group_bounds_splits_into_disjoint_groups():
    lw = torch.randn(10, 3, dtype=torch.float64)
    g = group_bounds(lw, 3)  # 3 groups, the 10th sample unused
    ref = np.log(np.exp(lw[:9].numpy().reshape(3, 3, 3)).mean(1))
    assert np.allclose(g.numpy(), ref, atol=1e-12)


def test_bound_vs_k_groups_one_sample_set_and_matches_log_likelihood():
    ks = (1, 2, 5, 10, 50, 100)
    n = 6
    table = _replay_table(100, n)
    res = bound_vs_k(ReplayModel(table), _points(n), ks=ks, batch_size=4, chunk_size=30)
    for i, k in enumerate(ks):
        groups = table.reshape(100 // k, k, n)
        expected = (torch.logsumexp(groups, 1) - math.log(k)).mean(0)
        assert torch.allclose(res.per_point[:, i], expected, atol=1e-9)
    assert res.groups == (100, 50, 20, 10, 2, 1)
    ll = log_likelihood(ReplayModel(table), _points(n), k=100, batch_size=4, chunk_size=30)
    assert torch.allclose(res.log_likelihood().per_point, ll.per_point, atol=1e-12)
    assert math.isnan(res.mc_stderr()[-1]) and not math.isnan(res.mc_stderr()[0])


def test_bound_vs_k_starts_at_the_elbo_and_rises_to_log_p():
    model = LinearGaussian(5, 2, noise_std=0.7, seed=2)
    x = data_from(model, 50, seed=4)
    res = bound_vs_k(model, x, ks=(1, 10, 100, 1000), batch_size=50, chunk_size=500, seed=5)
    mean, mc = res.mean(), res.mc_stderr()
    with torch.no_grad():
        elbo = float(model.elbo_closed_form(x).mean())
        log_p = float(model.log_marginal(x).mean())
    # L_1 averaged over 1000 groups is the ELBO within Monte Carlo error
    assert abs(mean[0] - elbo) < 4 * mc[0]
    assert all(a < b for a, b in zip(mean, mean[1:], strict=False))
    assert mean[-1] < log_p
    gap, gap_se = res.gap_to_largest()
    assert gap[-1] == 0.0 and gap[0] < -4 * gap_se[0]
    assert "| 1000 | 1 |" in res.table()


def test_a_float64_model_scores_float32_data_as_its_own_dtype():
    """The data is cast to the model's dtype (as LinearGaussian does inside): float32 binary
    images give bit for bit the estimate of the same images in float64, in both functions."""
    from elbolab.config import ModelConfig
    from elbolab.evaluation import evaluate_bounds
    from elbolab.models import build_model

    model = build_model(ModelConfig(latent_dim=3, hidden=(7,)), 10).double()
    x32 = torch.bernoulli(torch.full((6, 10), 0.4, dtype=torch.float32))
    got = log_likelihood(model, x32, k=20, batch_size=4, chunk_size=8, seed=5)
    want = log_likelihood(model, x32.double(), k=20, batch_size=4, chunk_size=8, seed=5)
    assert got.per_point.dtype == torch.float64 and torch.equal(got.per_point, want.per_point)
    assert evaluate_bounds(model, x32, k=5, seed=2) == evaluate_bounds(model, x32.double(), k=5, seed=2)


class _Killed(Exception):
    pass


class _DiesAfter:
    """Wraps a model; raises after ``calls`` log_weights calls, as a killed scoring would stop."""

    def __init__(self, model, calls: int) -> None:
        self.model, self.calls = model, calls

    def __getattr__(self, name):
        return getattr(self.model, name)

    def log_weights(self, x, k):
        if self.calls == 0:
            raise _Killed
        self.calls -= 1
        return self.model.log_weights(x, k)


def _mismatched(seed: int = 2) -> LinearGaussian:
    model = orthogonal_linear_gaussian(5, 2, seed=seed)
    with torch.no_grad():  # q off the posterior, so every point's estimate is random
        model.c.add_(0.3)
        model.q_log_var.add_(math.log(1.5))
    return model


def test_a_killed_scoring_continues_from_its_file_to_the_same_numbers(tmp_path):
    model = _mismatched()
    x = data_from(model, 23, seed=1)
    settings = dict(k=40, batch_size=4, chunk_size=15, seed=5)
    whole = log_likelihood(model, x, **settings).per_point
    keep = tmp_path / "scores.partial.pt"
    # 3 chunks per batch: dies inside the 4th batch, after 3 whole batches were kept
    with pytest.raises(_Killed):
        log_likelihood(_DiesAfter(model, 10), x, **settings, partial_file=keep, save_every_s=0)
    kept = torch.load(keep, weights_only=True)
    assert kept["done"] == 12 and torch.equal(kept["scores"], whole[:12])
    calls = _DiesAfter(model, 10**6)
    resumed = log_likelihood(calls, x, **settings, partial_file=keep, save_every_s=0).per_point
    assert torch.equal(resumed, whole)
    assert 10**6 - calls.calls == 3 * 3  # only the 3 unscored batches (4 + 4 + 3 points) ran
    assert not keep.exists()


@pytest.mark.parametrize("change", ["k", "seed", "weights", "data"])
def test_a_kept_file_from_another_scoring_is_not_continued(tmp_path, change):
    model = _mismatched()
    x = data_from(model, 12, seed=1)
    settings = dict(k=30, batch_size=4, chunk_size=100, seed=5)
    keep = tmp_path / "scores.partial.pt"
    with pytest.raises(_Killed):
        log_likelihood(_DiesAfter(model, 2), x, **settings, partial_file=keep, save_every_s=0)
    assert keep.exists()
    if change == "weights":
        model = _mismatched(seed=3)
    elif change == "data":
        x = x + 0.5
    else:
        settings[change] += 1
    whole = log_likelihood(model, x, **settings).per_point
    calls = _DiesAfter(model, 10**6)
    again = log_likelihood(calls, x, **settings, partial_file=keep, save_every_s=0).per_point
    assert torch.equal(again, whole) and 10**6 - calls.calls == 3


def test_a_damaged_kept_file_is_scored_afresh(tmp_path):
    model = _mismatched()
    x = data_from(model, 8, seed=1)
    keep = tmp_path / "scores.partial.pt"
    keep.write_bytes(b"not a torch file")
    whole = log_likelihood(model, x, k=20, batch_size=4, seed=5).per_point
    assert torch.equal(log_likelihood(model, x, k=20, batch_size=4, seed=5, partial_file=keep).per_point, whole)


def test_a_killed_summary_continues_its_is_scoring_from_the_kept_points(tmp_path, monkeypatch):
    from elbolab import evaluation
    from elbolab.diagnostics.summary import earlier_seconds, summarize

    monkeypatch.setattr(evaluation, "SAVE_EVERY_S", 0.0)
    model = _mismatched()
    x = data_from(model, 20, seed=1).float()
    whole = summarize(model, x, k_train=5, k_importance=30, batch_size=5, chunk_size=30, seed=3)
    keep = tmp_path / "scores.partial.pt"
    # the bounds take 4 calls (one per batch of 5), then IS dies inside its 3rd batch
    with pytest.raises(_Killed):
        summarize(_DiesAfter(model, 6), x, k_train=5, k_importance=30, batch_size=5, chunk_size=30, seed=3,
                  partial_file=keep)
    assert torch.load(keep, weights_only=True)["done"] == 10
    again = summarize(model, x, k_train=5, k_importance=30, batch_size=5, chunk_size=30, seed=3, partial_file=keep)
    assert earlier_seconds(whole) == 0.0 and earlier_seconds(again) > 0.0  # the killed sitting's time
    again["log_likelihood"].pop("earlier_seconds")
    whole["log_likelihood"].pop("earlier_seconds")
    assert again["log_likelihood"] == whole["log_likelihood"] and not keep.exists()


class _Clock:
    """A monotonic clock for evaluation that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Slow(_DiesAfter):
    """Each log_weights call takes ``seconds`` on the clock."""

    def __init__(self, model, calls: int, clock: _Clock, seconds: float) -> None:
        super().__init__(model, calls)
        self.clock, self.seconds = clock, seconds

    def log_weights(self, x, k):
        self.clock.now += self.seconds
        return super().log_weights(x, k)


def test_a_continued_scoring_counts_the_seconds_of_its_earlier_sittings(tmp_path, monkeypatch):
    from elbolab import evaluation

    clock = _Clock()
    monkeypatch.setattr(evaluation, "time", clock)
    model = _mismatched()
    x = data_from(model, 23, seed=1)
    settings = dict(k=40, batch_size=4, chunk_size=15, seed=5, save_every_s=0)
    keep = tmp_path / "scores.partial.pt"
    # 3 chunks per batch, 2 s each: the 3 batches kept took 18 s; the 4th dies after 2 s unsaved
    with pytest.raises(_Killed):
        log_likelihood(_Slow(model, 10, clock, 2.0), x, **settings, partial_file=keep)
    assert torch.load(keep, weights_only=True)["seconds"] == 18.0
    # killed again after one more batch (saved at 18 + 6 s), then finished
    with pytest.raises(_Killed):
        log_likelihood(_Slow(model, 4, clock, 2.0), x, **settings, partial_file=keep)
    assert torch.load(keep, weights_only=True)["seconds"] == 24.0
    done = log_likelihood(_Slow(model, 10**6, clock, 2.0), x, **settings, partial_file=keep)
    assert done.earlier_seconds == 24.0 and done.to_dict()["earlier_seconds"] == 24.0
    assert log_likelihood(model, x, **settings, partial_file=keep).earlier_seconds == 0.0  # nothing kept
