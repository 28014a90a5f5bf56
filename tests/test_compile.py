"""``train.compile``: a compiled objective computes the eager one, draws its samples, and
trains the same model to float rounding (kl_weight changing every step included)."""

from __future__ import annotations

import shutil

import pytest
import torch
from trainhelp import fit

import elbolab
from elbolab.config import ModelConfig, ObjectiveConfig, RunConfig
from elbolab.data import load
from elbolab.data.dataset import ImageDataset
from elbolab.fastpaths import compile_objective
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.runs import config_differences, read_metrics
from elbolab.training import RunState

needs_cxx = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                               reason="torch.compile's CPU backend needs a C++ compiler")


@pytest.mark.slow  # torch.compile builds C++ kernels: minutes on a cold cache
@needs_cxx
def test_compiled_objective_equals_eager_on_the_same_draws(one_thread) -> None:
    torch.manual_seed(0)
    data = torch.bernoulli(torch.full((32, 64), 0.3))
    model = build_model(ModelConfig(latent_dim=4, hidden=(16, 16)), 64, data)
    eager = make_objective(ObjectiveConfig(name="iwae", k=3))
    compiled = compile_objective(eager)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for beta in (0.25, 1.0):
        torch.manual_seed(5)
        want = eager(model, data[:8], beta)
        torch.manual_seed(5)
        got = compiled(model, data[:8], beta)
        torch.testing.assert_close(got.log_w, want.log_w, rtol=1e-5, atol=1e-4)  # same samples, not merely close bounds
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-4)
        g_want = torch.autograd.grad(want.loss, list(model.parameters()))
        g_got = torch.autograd.grad(got.loss, list(model.parameters()))
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert set(got.terms.log_posterior) == set(want.terms.log_posterior)  # fault reports still see every term
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # compiled: a KL weight and 1.0


def assert_same_training(compiled, eager) -> None:
    """(model, metrics rows) of a compiled and an eager run: parameters and every epoch's bound agree."""
    (m_comp, rows_comp), (m_eager, rows_eager) = compiled, eager
    for a, b in zip(m_comp.parameters(), m_eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(rows_comp) == len(rows_eager)
    for a, b in zip(rows_comp, rows_eager, strict=True):
        assert a["train_bound"] == pytest.approx(b["train_bound"], abs=1e-3)


@pytest.mark.slow
@needs_cxx
def test_compiled_training_matches_eager_training(tmp_path, one_thread) -> None:
    full = load("binarized-mnist-embedded")
    train = full.splits["train"][:130]  # 130 = 6 batches of 20 and one of 10
    data = ImageDataset("binarized-mnist-embedded", {"train": train, "valid": full.splits["valid"][:20]},
                        full.image_shape, binary=True)
    cfg = RunConfig().with_overrides({
        "data.name": "binarized-mnist-embedded", "model.latent_dim": 4, "model.hidden": [16, 16],
        "objective.name": "iwae", "objective.k": 3, "objective.warmup_epochs": 2, "train.epochs": 3,
        "train.batch_size": 20,
        "train.progress": False,
    })
    runs = {}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for flag in (False, True):
        c = cfg.with_overrides({"train.compile": flag})
        trainer = RunState(c, tmp_path / str(flag), data)
        fit(trainer)
        runs[flag] = (trainer.model, read_metrics(tmp_path / str(flag) / "metrics.jsonl"))
    assert_same_training(runs[True], runs[False])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # warm-up and full weight compiled
    assert config_differences(cfg.with_overrides({"train.compile": True}), cfg) == []  # a run may resume either way


def test_compile_without_a_cxx_compiler_is_refused_naming_the_option(monkeypatch, tmp_path) -> None:
    from elbolab.config import ConfigError

    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    cfg = RunConfig().with_overrides({"train.compile": True, "train.progress": False})
    with pytest.raises(ConfigError, match="train.compile: .*C\\+\\+ compiler"):
        elbolab.train(config=cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
