"""Exact in-process resume (dynamic binarization included) and the non-finite policy:
NaN/inf injected into a term or a gradient is caught in the step, named, and skipped or stopped."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from trainhelp import fit

import elbolab.training.loop as train_loop
import elbolab.training.state as train_state
from elbolab import cli
from elbolab.config import RunConfig
from elbolab.data.dataset import ImageDataset
from elbolab.runs import load_checkpoint
from elbolab.training import NonFiniteError, RunState


def grey_dataset() -> ImageDataset:
    """Grey-level images, so that dynamic binarization draws fresh bits every epoch."""
    g = torch.Generator().manual_seed(3)
    splits = {"train": torch.randint(0, 256, (200, 16), generator=g, dtype=torch.uint8),
              "valid": torch.randint(0, 256, (40, 16), generator=g, dtype=torch.uint8)}
    return ImageDataset("grey-test", splits, (4, 4), binary=False)


def small_config(**train) -> RunConfig:
    over = {"data.binarization": "dynamic", "model.hidden": [8], "model.latent_dim": 3, "objective.k": 3,
            "objective.warmup_epochs": 1, "train.epochs": 3, "train.batch_size": 20, "train.progress": False,
            "train.checkpoint_minutes": 0, "train.early_stopping_patience": 2, "train.threads": 1}
    over.update({f"train.{k}": v for k, v in train.items()})
    return RunConfig().with_overrides(over)


pytestmark = pytest.mark.usefixtures("restore_threads")


class Crash(Exception):
    """Stands in for a killed process: nothing in memory survives to the resumed run."""


def test_resume_in_process_with_dynamic_binarization_is_exact(tmp_path, monkeypatch):
    cfg = small_config(checkpoint_steps=4)
    ref = RunState(cfg, tmp_path / "ref", grey_dataset())
    fit(ref)
    calls = {"n": 0}

    def crash_at_step_17(name: str) -> None:
        calls["n"] += name == "step"
        if calls["n"] == 17:  # epoch 2, batch 7; last checkpoint at step 16
            raise Crash

    monkeypatch.setattr(train_loop, "fault_point", crash_at_step_17)
    with pytest.raises(Crash):
        fit(RunState(cfg, tmp_path / "run", grey_dataset()))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 16
    monkeypatch.setattr(train_loop, "fault_point", lambda name: None)
    resumed = RunState(cfg, tmp_path / "run", grey_dataset())
    fit(resumed)  # automatic: same config, unfinished
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(ref.batcher.generator.get_state(), resumed.batcher.generator.get_state())
    assert resumed.step == ref.step == 30


def test_rng_states_round_trip():
    """torch's and the shuffler's streams come back; numpy's and Python's global ones, which training
    never draws from, are not stored (their unseeded states made identical runs' checkpoints differ)."""
    t = RunState(small_config(), "unused", grey_dataset())
    state = t.state()
    assert not {"numpy", "python"} & set(state["rng"])
    draws = (torch.rand(2), torch.rand(2, generator=t.shuffle))
    t.load_state(state)
    again = (torch.rand(2), torch.rand(2, generator=t.shuffle))
    assert torch.equal(draws[0], again[0]) and torch.equal(draws[1], again[1])


def poison(trainer: RunState, at_steps: set[int], term: str = "likelihood", value: float = math.nan) -> None:
    """Make the log-weight terms of the given training steps (1-based) non-finite for image 1."""
    model = trainer.model
    real = model.log_weight_terms
    seen = {"n": 0}

    def terms(x, k, **kw):
        out = real(x, k, **kw)
        if not model.training:
            return out
        seen["n"] += 1
        if seen["n"] in at_steps:
            bad = torch.zeros_like(out.log_likelihood)
            bad[:, 1] = value
            if term == "likelihood":
                out.log_likelihood = out.log_likelihood + bad
            elif term == "prior":
                out.log_prior = {n: t + bad for n, t in out.log_prior.items()}
            elif term == "gradient":  # finite loss, NaN gradient through the samples
                out.z["z"].register_hook(lambda g: g * math.nan)
        return out

    model.log_weight_terms = terms


def test_nan_in_reconstruction_is_skipped_and_named(tmp_path, caplog):
    t = RunState(small_config(nonfinite="skip", max_nonfinite_skips=3), tmp_path / "run", grey_dataset())
    poison(t, {3})
    with caplog.at_level(logging.WARNING, logger="elbolab"):
        fit(t)
    msg = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 3 (epoch 1, batch 2)" in msg
    assert "reconstruction log p(x|z) non-finite for 1 of 20 images" in msg
    assert "training images [" in msg and "step skipped (1 of 3 allowed)" in msg
    assert t.nonfinite_skips == 1
    adam_steps = int(next(iter(t.optimizer.state.values()))["step"])
    assert adam_steps == t.step - 1 == 29  # the poisoned step left the optimizer untouched
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["nonfinite_skips"] == 1


def test_stop_policy_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    t = RunState(small_config(nonfinite="stop", checkpoint_steps=2), run, grey_dataset())
    poison(t, {3}, term="prior", value=-math.inf)
    with pytest.raises(NonFiniteError) as err:
        fit(t)
    assert "step 3 (epoch 1, batch 2)" in str(err.value)
    assert "prior log p(z) (KL, layer z) non-finite for 1 of 20 images" in str(err.value)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "step 3" in info["error"]


def test_nan_gradient_with_finite_loss_is_caught_and_names_layers(tmp_path):
    t = RunState(small_config(nonfinite="stop"), tmp_path / "run", grey_dataset())
    poison(t, {2}, term="gradient")
    with pytest.raises(NonFiniteError) as err:
        fit(t)
    msg = str(err.value)
    assert "step 2" in msg and "gradient non-finite in encoder.0.weight" in msg
    assert "loss=" not in msg and "log p(x|z)" not in msg  # the loss and terms were finite


def test_skip_budget_runs_out_then_stops(tmp_path):
    t = RunState(small_config(nonfinite="skip", max_nonfinite_skips=2), tmp_path / "run", grey_dataset())
    poison(t, {3, 4, 5, 6})
    with pytest.raises(NonFiniteError) as err:
        fit(t)
    assert "step 5" in str(err.value) and "2 skipped steps already" in str(err.value)


def test_cli_exit_code_3_on_numerical_fault(tmp_path, monkeypatch, capsys):
    real = train_state.make_objective

    def nan_objective(cfg):
        objective = real(cfg)

        def fn(model, x, kl_weight):
            res = objective(model, x, kl_weight)
            res.loss = res.loss * math.nan
            return res

        return fn

    monkeypatch.setattr(train_state, "make_objective", nan_objective)
    code = cli.main(["train", "--no-eval", "--out", str(tmp_path / "run"), "--set", "train.nonfinite=stop",
                     "--set", "model.hidden=[8]", "--set", "model.latent_dim=2", "--set", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_NUMERICAL == 3
    assert err.count("\n") == 1 and "numerical fault" in err and "step 1" in err and "loss=nan" in err


def test_one_host_sync_per_step(tmp_path, monkeypatch):
    """The NaN check rides on the one transfer that reads the logged bound: count every
    tensor-to-Python conversion made by the train package during a run of one epoch of 10 steps."""
    import sys
    from pathlib import Path

    t = RunState(small_config(epochs=1, eval_every=0), tmp_path / "run", grey_dataset())
    package = Path(train_state.__file__).parent
    calls = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            if Path(sys._getframe(1).f_code.co_filename).parent == package:
                calls.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    fit(t)
    assert calls == ["tolist"] * 10


def test_time_based_checkpoints_record_the_position(tmp_path, monkeypatch):
    class Clock:  # 30 s pass at every look at the clock
        now = 0.0

        @classmethod
        def monotonic(cls) -> float:
            cls.now += 30.0
            return cls.now

        perf_counter = staticmethod(lambda: 0.0)

    saved = []
    real_save = RunState.save_checkpoint

    def save(self):
        saved.append((self.step, self.next_batch))
        real_save(self)

    monkeypatch.setattr(train_state, "time", Clock)
    monkeypatch.setattr(train_loop, "time", Clock)
    monkeypatch.setattr(RunState, "save_checkpoint", save)
    fit(RunState(small_config(epochs=1, checkpoint_minutes=1.0), tmp_path / "run", grey_dataset()))
    assert saved[:2] == [(2, 2), (4, 4)]  # every minute of (fake) time, mid-epoch
    assert saved[-1] == (10, 0)  # and at the end


def test_sigterm_checkpoints_at_the_step_and_restores_handlers(tmp_path, monkeypatch):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    steps = {"n": 0}

    def terminate_at_step_5(name: str) -> None:
        steps["n"] += name == "step"
        if steps["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_loop, "fault_point", terminate_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        fit(RunState(small_config(), tmp_path / "run", grey_dataset()))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (ckpt["step"], ckpt["position"]["next_batch"]) == (5, 5)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_early_stopping_does_not_count_warmup_epochs_but_tracks_the_best(tmp_path, monkeypatch):
    """The VampPrior code's rule: during KL warm-up the count of epochs without a better
    validation bound stays 0, while the best weights are still kept. Scripted bounds: the best
    comes in warm-up (epoch 3 of 4); patience 2 then stops at epoch 6 (it would stop at 5 if
    warm-up epochs counted)."""
    bounds = iter([-100.0, -101.0, -90.0, -95.0, -96.0, -97.0, -98.0, -99.0])
    best_weights = {}

    def scripted(self):
        value = next(bounds)
        if value == -90.0:
            best_weights.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return {"valid_elbo": value, "valid_iwae_3": value}

    monkeypatch.setattr(RunState, "validate", scripted)
    t = RunState(small_config(epochs=8, early_stopping_patience=2, checkpoint_steps=0)
                .with_overrides({"objective.warmup_epochs": 4}), tmp_path / "run", grey_dataset())
    fit(t)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert t.best_valid == -90.0 and t.epochs_since_best == 2
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert set(best) == set(best_weights)
    for k, v in best.items():
        assert torch.equal(v, best_weights[k]), k


def test_the_time_left_counts_the_epochs_trained_before_a_resume(tmp_path, monkeypatch, caplog):
    """Epoch lines end with the time left, from the last epochs' seconds in metrics.jsonl: a resumed
    run's first estimate already averages the epochs trained before it was killed."""
    cfg = small_config(epochs=4, early_stopping_patience=0)
    steps = {"n": 0}

    def crash_in_epoch_3(name: str) -> None:
        steps["n"] += name == "step"
        if steps["n"] == 21:  # epoch 3, batch 1; the checkpoint of epoch 2's end is the last
            raise Crash

    monkeypatch.setattr(train_loop, "fault_point", crash_in_epoch_3)
    with pytest.raises(Crash):
        fit(RunState(cfg, tmp_path / "run", grey_dataset()))
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # as if the killed process had trained slowly: 100 s and 200 s (monitor included)
    rows[0]["seconds"], rows[1]["seconds"], rows[1]["monitor_seconds"] = 100.0, 150.0, 50.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(train_loop, "fault_point", lambda name: None)
    caplog.set_level(logging.INFO, "elbolab")
    caplog.clear()
    resumed = RunState(cfg, tmp_path / "run", grey_dataset())
    fit(resumed)
    lines = [m for m in caplog.messages if m.startswith("epoch ")]
    assert [m.split(":")[0] for m in lines] == ["epoch 3/4", "epoch 4/4"]
    third = json.loads(metrics.read_text().splitlines()[2])
    left = (300.0 + third["seconds"]) / 3  # the mean of epochs 1-3, one epoch to go: just over 100 s
    assert lines[0].endswith(f", {train_state.time_left(left)} left") and lines[0].endswith("~2 min left")
    assert "left" not in lines[1]  # the last epoch's line has none
