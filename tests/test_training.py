"""End to end: the CLI trains on the embedded data to a stated bound and the run reloads."""

from __future__ import annotations

import json

import pytest
import torch

import elbolab
from elbolab.cli import main
from elbolab.data import load
from elbolab.diagnostics import evaluate_bounds

#: A model that cannot use its latents (decoder = mean image) sits near -206 nats on
#: binarized MNIST; 15 epochs of the default one-layer IWAE reach about -118, and 2 epochs of
#: the small model below about -159 (a second or two of CPU: the fast tier's end-to-end run).
ELBO_THRESHOLD = -130.0
SMALL_THRESHOLD = -175.0
SMALL = ["--set", "train.epochs=2", "--set", "model.hidden=[64]", "--set", "model.latent_dim=8",
         "--set", "train.threads=1", "--set", "eval.k_importance=20"]


def _train(out, *sets: str):
    assert main(["train", "--out", str(out), "--set", "train.progress=false", *sets]) == 0
    return out


def _check_learned(run, threshold: float, epochs: int) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["elbo"] > threshold
    # the ordering every bound must respect: ELBO <= L_5 <= IS estimate (within MC error)
    assert report["elbo"] < report["iwae_5"] < report["log_likelihood"]["mean"] + 0.5
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    assert metrics[-1]["valid_iwae_5"] > metrics[0]["valid_iwae_5"] + 3


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("runs") / "small", *SMALL)


def test_short_training_beats_the_threshold(trained_run) -> None:
    _check_learned(trained_run, SMALL_THRESHOLD, 2)


@pytest.mark.slow
def test_the_default_model_beats_the_threshold_in_15_epochs(tmp_path) -> None:
    run = _train(tmp_path / "demo", "--set", "train.epochs=15", "--set", "eval.k_importance=200")
    _check_learned(run, ELBO_THRESHOLD, 15)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["valid_iwae_5"] > metrics[0]["valid_iwae_5"] + 10


def test_run_folder_reloads_in_one_call_with_the_same_bound(trained_run) -> None:
    run = elbolab.load_run(trained_run)
    assert run.config.train.epochs == 2
    assert {"config.yaml", "run.json", "environment.json", "metrics.jsonl", "model.safetensors",
            "checkpoint.pt", "report.json"} <= {p.name for p in trained_run.iterdir()}
    x = load("binarized-mnist-embedded").as_float("test")
    again = evaluate_bounds(run.model, x, k=5, seed=run.config.eval.seed)
    assert again["elbo"] == pytest.approx(run.report["elbo"], abs=1e-6)
    assert not any(p.requires_grad and p.grad is not None for p in run.model.parameters())
    env = json.loads((trained_run / "environment.json").read_text())
    assert env["torch"] == torch.__version__


def test_existing_run_folder_is_not_overwritten(trained_run, capsys) -> None:
    before = (trained_run / "model.safetensors").read_bytes()
    code = main(["train", "--out", str(trained_run), "--set", "train.epochs=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds a run of another config" in err and "nothing was changed" in err
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_bad_option_exits_2_naming_the_key(tmp_path, capsys) -> None:
    assert main(["train", "--out", str(tmp_path / "x"), "--set", "objective.k=0"]) == 2
    assert "objective.k: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
