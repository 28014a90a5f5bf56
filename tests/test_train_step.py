"""The training step's seam, the stacked optimizers' use of a private torch API, run_status,
and preflight running once per command."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch

import elbolab.preflight
from elbolab import cli
from elbolab.config import RunConfig
from elbolab.data.dataset import ImageDataset
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.optimizers import make_optimizer
from elbolab.runs import DAMAGED, NO_RUN, run_status
from elbolab.training import NonFiniteError, PlainStep, RunOutcome, StackedStep, StepRun, make_step, take_step
from elbolab.training.step import step_optimizers

TINY = {"model.hidden": [8], "model.latent_dim": 3, "objective.k": 2}


def _adams(n: int) -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        out.append((m, torch.optim.Adam(m.parameters(), lr=1e-2 * (1 + seed % 2), fused=True)))
    return out


def _grads(models: list[torch.nn.Module], step: int) -> None:
    for i, m in enumerate(models):
        g = torch.Generator().manual_seed(100 * step + i)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)


def test_adam_init_group_is_what_the_stacked_optimizers_rely_on():
    """step.step_optimizers hands Adam's kernel every run's tensors through Adam._init_group (a private
    method): its signature and the lists it fills must be as this torch had them, else this fails."""
    names = list(inspect.signature(torch.optim.Adam._init_group).parameters)
    assert names == ["self", "group", "params_with_grad", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                     "state_steps"]


def test_stacked_optimizers_step_each_run_as_its_own_step_does(monkeypatch):
    """Three fused Adams (two learning rates) stepped in batches by step_optimizers end bit for bit
    where each one's own ``step()`` leaves them, parameters and state, over three steps."""
    batched, alone = _adams(3), _adams(3)
    calls = {"n": 0}
    real = torch.optim.Adam.step

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    for t in range(3):
        _grads([m for m, _ in batched], t)
        _grads([m for m, _ in alone], t)
        monkeypatch.setattr(torch.optim.Adam, "step", counted)
        step_optimizers([o for _, o in batched])
        monkeypatch.setattr(torch.optim.Adam, "step", real)
        for _, o in alone:
            o.step()
    assert calls["n"] == 0, "the fused Adams were stepped one by one, not in one kernel call"
    for (ma, oa), (mb, ob) in zip(batched, alone, strict=True):
        for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
            assert torch.equal(p, q)
        for sa, sb in zip(oa.state.values(), ob.state.values(), strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_make_step_is_the_seam_and_a_run_with_its_own_stream_steps_as_on_the_global_one():
    """One run: the plain step; several: the stacked one. A run drawing from its own generator takes
    the bits of take_step on torch's global stream in the same state."""
    cfg = RunConfig().with_overrides(TINY)
    x = torch.bernoulli(torch.rand(2, 6, 784, generator=torch.Generator().manual_seed(0)))

    def run(seed: int, generator: torch.Generator | None) -> StepRun:
        torch.manual_seed(seed)
        model = build_model(cfg.model, 784)
        run = StepRun.plain(model, make_optimizer(model, cfg.train, torch.device("cpu")),
                            make_objective(cfg.objective), cfg.objective)
        run.generator = generator
        return run

    plain = run(0, None)
    torch.manual_seed(5)
    res, bound, taken = take_step(plain.model, plain.optimizer, plain.objective, x[0])
    own = run(0, torch.Generator().manual_seed(5))
    step = make_step([own])
    assert isinstance(step, PlainStep) and step.model is own.model
    (out,) = step.step(x[:1], [1.0])
    assert out.taken and taken and out.bound_sum == bound
    for p, q in zip(plain.model.parameters(), own.model.parameters(), strict=True):
        assert torch.equal(p, q)
    two = make_step([run(0, torch.Generator().manual_seed(1)), run(1, torch.Generator().manual_seed(2))])
    assert isinstance(two, StackedStep)
    outs = two.step(x, [1.0, 0.5])
    assert len(outs) == 2 and all(o.taken for o in outs) and outs[0].bound_sum != outs[1].bound_sum
    with pytest.raises(ValueError, match="at least one run"):
        make_step([])


def test_run_status_reads_a_folder_one_way_for_every_caller(tmp_path):
    assert run_status(tmp_path / "nothing") == NO_RUN
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "interrupted"}))
    assert run_status(run) == "interrupted"
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    assert run_status(run) == DAMAGED  # finished, but its final weights are gone
    (run / "model.safetensors").write_bytes(b"")
    assert run_status(run) == "finished"
    with pytest.raises(NonFiniteError, match="step 3"):
        RunOutcome(run, "failed", "non-finite value at step 3").raise_if_failed()
    RunOutcome(run, "finished").raise_if_failed()


@pytest.mark.parametrize("sweep", [False, True])
def test_preflight_runs_once_per_run(tmp_path, monkeypatch, sweep):
    """``elbolab train`` checks a run's config once (the trainer does not check it again)."""
    calls = []
    real = elbolab.preflight.check_optional_packages
    monkeypatch.setattr(elbolab.preflight, "check_optional_packages", lambda cfg: calls.append(1) or real(cfg))
    data = ImageDataset("t", {"train": torch.zeros(40, 16, dtype=torch.uint8),
                              "test": torch.zeros(10, 16, dtype=torch.uint8)}, (4, 4), binary=True)
    monkeypatch.setattr("elbolab.cli.train.load", lambda *a, **k: copy.copy(data))
    monkeypatch.setattr("elbolab.cli.sweep.load", lambda *a, **k: copy.copy(data))
    args = ["train", "--no-eval", "--out", str(tmp_path / "run"), "--set", "train.epochs=1",
            "--set", "train.progress=false", "--set", "model.hidden=[4]", "--set", "model.latent_dim=2",
            "--set", "train.batch_size=20"]
    if sweep:
        args += ["--sweep", "train.seed=0,1"]
    assert cli.main(args) == 0
    assert len(calls) == (2 if sweep else 1)
