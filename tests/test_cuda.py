"""The CUDA path against the CPU path and against closed forms.

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
CPU and CUDA draw different random numbers, so deterministic pieces (encoder
outputs, prior densities, log p(x, z) at given z) must agree to float32 rounding and
Monte Carlo quantities must agree within their standard errors.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal

import pytest
import torch

import elbolab
from elbolab.cli import main
from elbolab.config import ModelConfig, ObjectiveConfig, RunConfig
from elbolab.data import load
from elbolab.diagnostics import evaluate_bounds, log_likelihood
from elbolab.diagnostics.active_units import active_units
from elbolab.diagnostics.q_ew import sample_q_ew
from elbolab.diagnostics.surgery import elbo_surgery
from elbolab.models import build_model
from elbolab.models.linear_gaussian import LinearGaussian

#: ``ELBOLAB_TEST_DEVICE=cpu`` runs these tests CPU against CPU (a dry run of the file without a GPU)
CUDA = torch.device(os.environ.get("ELBOLAB_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load("binarized-mnist-embedded").as_float("train")


def small_model(name: str, prior: str, train: torch.Tensor):
    cfg = RunConfig().with_overrides({
        "model.name": name, "model.prior.name": prior, "model.prior.components": 20,
    }).model
    torch.manual_seed(0)
    return build_model(cfg, train.shape[1], train[:2000])


MODELS = [(m, p) for m in ("one-layer", "two-layer", "hierarchical")
          for p in ("standard", "mog", "vampprior", "vampprior-data")]


@pytest.mark.parametrize(("name", "prior"), MODELS)
def test_deterministic_pieces_agree_between_cpu_and_cuda(images, name, prior) -> None:
    cpu = small_model(name, prior, images).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = images[:64]
    with torch.no_grad():
        q_cpu, q_gpu = cpu.top_posterior(x), gpu.top_posterior(x.to(CUDA))
        torch.testing.assert_close(q_gpu.mean.cpu(), q_cpu.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(q_gpu.log_var.cpu(), q_cpu.log_var, rtol=1e-4, atol=1e-4)
        z = torch.randn(5, 64, cpu.prior.latent_dim)
        torch.testing.assert_close(gpu.prior.log_prob(z.to(CUDA)).cpu(), cpu.prior.log_prob(z), rtol=1e-5, atol=1e-3)
        drawn = gpu.prior.sample(7)
        assert drawn.device.type == CUDA.type and drawn.shape == (7, cpu.prior.latent_dim)
        assert torch.isfinite(drawn).all()


@pytest.mark.parametrize(("name", "prior"), MODELS)
def test_log_weights_on_cuda_have_the_cpu_mean_within_monte_carlo_error(images, name, prior) -> None:
    cpu = small_model(name, prior, images).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = images[100:116]
    with torch.no_grad():
        a = cpu.log_weights(x, 4000).double()
        b = gpu.log_weights(x.to(CUDA), 4000).double().cpu()
    se = torch.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0])
    z = (b.mean(0) - a.mean(0)) / se
    assert z.abs().max() < 5, z


def reasonable_q(m: LinearGaussian) -> None:
    s2 = torch.exp(m.log_noise_var)
    eye = torch.eye(m.latent_dims[0], dtype=m.W.dtype, device=m.W.device)
    cov = torch.linalg.inv(eye + m.W.T @ m.W / s2)
    with torch.no_grad():
        m.A.copy_(cov @ m.W.T / s2)
        m.c.copy_(-(cov @ m.W.T @ m.b) / s2)
        m.q_log_var.copy_(torch.log(torch.diagonal(cov)))


@pytest.fixture
def linear_gaussian() -> tuple[LinearGaussian, torch.Tensor]:
    m = LinearGaussian(data_dim=6, latent_dim=3, noise_std=0.8, seed=2).to(CUDA)
    reasonable_q(m)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(8, 6, generator=g, dtype=torch.float64) * 1.5).to(CUDA) + m.b.detach()
    return m, x


def test_is_log_likelihood_on_cuda_is_within_005_nats_of_the_closed_form(linear_gaussian) -> None:
    m, x = linear_gaussian
    est = log_likelihood(m, x, k=5000, batch_size=4, chunk_size=1000, seed=0)
    exact = m.log_marginal(x).detach().cpu()
    assert (est.per_point - exact).abs().max() < 0.05
    assert est.per_point.device.type == "cpu"  # results come back to the host


def test_q_ew_draws_on_cuda_have_the_exact_posterior_mean(linear_gaussian) -> None:
    m, x = linear_gaussian
    draws = sample_q_ew(m, x, k=200, n=4000, seed=1)
    (z,) = draws.values()
    assert z.device.type == CUDA.type
    mean, cov = m.exact_posterior(x)
    se = torch.sqrt(torch.diagonal(cov) / z.shape[0])
    assert ((z.mean(0) - mean).abs() / se).max() < 5
    var = z.var(0)  # [B, d]: the implicit posterior's variance approaches the exact one as K grows
    torch.testing.assert_close(var, torch.diagonal(cov).expand_as(var), rtol=0.1, atol=0)


def test_surgery_and_active_units_on_cuda_match_cpu(images) -> None:
    cfg = RunConfig().with_overrides({"model.latent_dim": 5, "model.hidden": [64]}).model
    torch.manual_seed(0)
    cpu = build_model(cfg, images.shape[1], images).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = images[:3000]
    s_cpu, s_gpu = elbo_surgery(cpu, x, samples=4), elbo_surgery(gpu, x, samples=4)
    assert s_gpu.average_kl == pytest.approx(s_cpu.average_kl, rel=1e-4)  # analytic: deterministic
    for key in ("mutual_information", "marginal_kl", "reconstruction"):
        se = math.hypot(getattr(s_cpu, key + "_stderr"), getattr(s_gpu, key + "_stderr"))
        assert abs(getattr(s_gpu, key) - getattr(s_cpu, key)) < 4 * se, key
    assert 0 <= s_gpu.mutual_information <= s_gpu.log_n
    a_cpu, a_gpu = active_units(cpu, x), active_units(gpu, x)
    torch.testing.assert_close(a_gpu.activity[0].cpu(), a_cpu.activity[0], rtol=1e-3, atol=1e-6)
    assert a_gpu.counts == a_cpu.counts


def test_training_on_cuda_reloads_on_cpu_with_the_same_bounds(tmp_path) -> None:
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--set", f"train.device={CUDA}", "--set", "train.epochs=3",
                 "--set", "eval.k_importance=100", "--set", "train.progress=false"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["elbo"] > -160  # it learned: the mean-image model sits near -206
    x = load("binarized-mnist-embedded").as_float("test")
    on_gpu = elbolab.load_run(out, device=str(CUDA))
    again = evaluate_bounds(on_gpu.model, x, k=5, seed=on_gpu.config.eval.seed)
    assert again["elbo"] == pytest.approx(report["elbo"], abs=1e-4)  # same device, same seed: same draws
    on_cpu = elbolab.load_run(out, device="cpu")
    cpu = evaluate_bounds(on_cpu.model, x, k=50, seed=1)
    gpu = evaluate_bounds(on_gpu.model, x, k=50, seed=1)
    assert cpu["elbo"] == pytest.approx(gpu["elbo"], abs=0.3)  # 50,000 draws each: MC error ~0.05
    assert cpu["iwae_50"] == pytest.approx(gpu["iwae_50"], abs=0.3)


def test_diagnose_and_snr_on_cuda_give_consistent_reports(tmp_path) -> None:
    run, out = tmp_path / "tiny", tmp_path / "report"
    assert main(["train", "--out", str(run), "--no-eval", "--device", str(CUDA), "--set", "train.epochs=1",
                 "--set", "model.latent_dim=2", "--set", "model.hidden=[32]", "--set", "train.progress=false",
                 "--set", "train.eval_every=0"]) == 0
    assert main(["diagnose", str(run), "--device", str(CUDA), "--k", "50", "--points", "120",
                 "--out", str(out)]) == 0
    r = json.loads((out / "diagnostics.json").read_text())
    assert r["log_likelihood"]["mean"] == pytest.approx(r["bound_vs_k"]["mean"][-1], abs=1e-12)
    s = r["surgery"]
    assert 0 <= s["mutual_information"] <= s["log_n"]
    assert abs(s["identity_error"]) < 4 * s["identity_stderr"]
    for p in r["q_ew"]["points"]:
        elbos = [p["elbo_q_ew"][str(k)] for k in r["q_ew"]["ks"]]
        assert all(a < b for a, b in zip(elbos, elbos[1:], strict=False))
        assert elbos[-1] <= p["log_p"] + 1e-6
    assert main(["snr", str(run), "--device", str(CUDA), "--k", "1", "10", "--draws", "20"]) == 0


def reference_and_killed_run(tmp_path):
    """An uninterrupted run on the device, and the same run SIGKILLed mid-epoch 2 (test_crash_resume's
    settings): (reference folder, killed folder)."""
    from test_crash_resume import elbolab_train, finish, fresh_args, wait_until_frozen

    on_device = ["--set", f"train.device={CUDA}"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    finish(elbolab_train(*fresh_args(ref), *on_device))
    proc = elbolab_train(*fresh_args(run), *on_device, stop_at="step#75")
    try:
        wait_until_frozen(proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return ref, run


def test_sigkill_mid_epoch_on_cuda_then_resume_is_bit_identical(tmp_path) -> None:
    from test_crash_resume import elbolab_train, finish, outcome

    ref, run = reference_and_killed_run(tmp_path)
    finish(elbolab_train("--resume", str(run)))
    got, want = outcome(run), outcome(ref)
    assert got[2] == want[2], "metrics differ from the uninterrupted run"
    assert got[0] == want[0], "final weights differ from the uninterrupted run"


def test_compiled_objective_on_cuda_equals_eager() -> None:
    from elbolab.fastpaths import compile_objective
    from elbolab.objectives import make_objective

    torch.manual_seed(0)
    data = torch.bernoulli(torch.full((32, 64), 0.3))
    model = build_model(ModelConfig(latent_dim=4, hidden=(16, 16)), 64, data).to(CUDA)
    x = data[:8].to(CUDA)
    eager = make_objective(ObjectiveConfig(name="iwae", k=3))
    compiled = compile_objective(eager)
    for beta in (0.25, 1.0):
        torch.manual_seed(5)
        want = eager(model, x, beta)
        torch.manual_seed(5)
        got = compiled(model, x, beta)
        torch.testing.assert_close(got.log_w, want.log_w, rtol=1e-5, atol=1e-4)
        g_want = torch.autograd.grad(want.loss, list(model.parameters()))
        g_got = torch.autograd.grad(got.loss, list(model.parameters()))
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_benchmark_rows_on_cuda_count_device_memory_and_peak(tmp_path) -> None:
    from elbolab.cli.bench import add_arguments
    from elbolab.speed import run

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--quick", "--device", str(CUDA), "--no-pythae", "--only", "one-layer IWAE k=50 B=100",
                         "--out", str(tmp_path)])
    res = run(args, log=lambda s: None)
    (row,) = [r for r in res["rows"] if r["library"] == "elbolab"]
    # a k=50 batch-100 step holds [50, 100, 784] float32 logits and their gradient: > 15 MB on the device
    assert row["peak_mb"] > 15
    assert 0 < row["of_peak"] < 1.5
    if CUDA.type == "cuda":
        assert res["machine"]["gpu"] == torch.cuda.get_device_name()


def test_compiled_training_on_cuda_with_cuda_graphs_matches_eager(tmp_path) -> None:
    """train.compile on a GPU replays CUDA graphs (mode reduce-overhead): same samples, same model."""
    from test_compile import assert_same_training
    from trainhelp import fit

    from elbolab.data.dataset import ImageDataset
    from elbolab.runs import read_metrics
    from elbolab.training import RunState

    full = load("binarized-mnist-embedded")
    data = ImageDataset("binarized-mnist-embedded", {"train": full.splits["train"][:130],
                                                     "valid": full.splits["valid"][:20]},
                        full.image_shape, binary=True)
    cfg = RunConfig().with_overrides({
        "data.name": "binarized-mnist-embedded", "model.latent_dim": 4, "model.hidden": [16, 16],
        "objective.name": "iwae", "objective.k": 3, "objective.warmup_epochs": 2, "train.epochs": 3,
        "train.batch_size": 20, "train.progress": False, "train.device": str(CUDA),
    })
    runs = {}
    for flag in (False, True):
        trainer = RunState(cfg.with_overrides({"train.compile": flag}), tmp_path / str(flag), data)
        fit(trainer)
        runs[flag] = (trainer.model, read_metrics(tmp_path / str(flag) / "metrics.jsonl"))
    assert_same_training(runs[True], runs[False])


def test_a_run_killed_on_the_gpu_continues_on_the_cpu(tmp_path) -> None:
    from test_crash_resume import elbolab_train, finish

    ref, run = reference_and_killed_run(tmp_path)
    finish(elbolab_train("--resume", str(run), "--device", "cpu"))
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == {**want[0], "seconds": rows[0]["seconds"]}  # epoch 1 ran on the GPU in both
    # epoch 2: 25 batches on the GPU, then 25 drawn from the CPU's random stream
    assert rows[1]["train_bound"] == pytest.approx(want[1]["train_bound"], abs=2.0)
    assert all(torch.isfinite(p).all() for p in elbolab.load_run(run, device="cpu").model.parameters())
