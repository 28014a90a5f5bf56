"""elbolab.train_model keeps a run folder as elbolab.train does: atomic checkpoints, a resume after a
kill that ends bit for bit as the run never stopped, metrics.jsonl, the monitor, TensorBoard, and
refusals naming what differs when another model, data or config meets the folder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elbolab
import elbolab.training.loop as train_loop
from elbolab.config import ConfigError
from elbolab.models.base import LogWeightTerms
from elbolab.runs import RunError, load_checkpoint, load_run

D = 6


class TinyVAE(nn.Module):
    """A user's own model: nothing of elbolab's but ``log_weight_terms`` (Gaussian q, N(0, I) prior,
    Bernoulli decoder), its weights seeded so two instances start equal."""

    def __init__(self, latent: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(D, 2 * latent)
        self.dec = nn.Linear(latent, D)

    def log_weight_terms(self, x: torch.Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        mean, log_var = self.enc(x).chunk(2, dim=-1)
        std = (0.5 * log_var).exp()
        z = mean + std * torch.randn(k, *mean.shape, dtype=mean.dtype, device=mean.device)
        q = torch.distributions.Normal(mean.detach() if stop_posterior_grad else mean,
                                       std.detach() if stop_posterior_grad else std)
        log_q = q.log_prob(z).sum(-1)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_lik = -F.binary_cross_entropy_with_logits(self.dec(z), x.expand(k, *x.shape), reduction="none").sum(-1)
        return LogWeightTerms(log_lik, {"z": log_p}, {"z": log_q}, {"z": z})

    def log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.log_weight_terms(x, k).log_weights()


class Crash(Exception):
    """Stands in for a kill: nothing in memory reaches the next call."""


def data(n: int = 40, seed: int = 1) -> torch.Tensor:
    return (torch.rand(n, D, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


#: 40 points in batches of 10: 4 steps an epoch, checkpoints every 3 steps (mid-epoch too)
ARGS = dict(epochs=3, batch_size=10, lr=1e-2, k=3, progress=False, **{"train.checkpoint_steps": 3})


def crash_at(monkeypatch, step: int) -> None:
    seen = {"n": 0}

    def stop(name: str) -> None:
        seen["n"] += name == "step"
        if seen["n"] == step:
            raise Crash

    monkeypatch.setattr(train_loop, "fault_point", stop)


@pytest.fixture
def killed(tmp_path, monkeypatch):
    """A wrapped run killed at step 8 (epoch 2, batch 4; its last checkpoint is step 6's)."""
    crash_at(monkeypatch, 8)
    with pytest.raises(Crash):
        elbolab.train_model(TinyVAE(), data(), tmp_path / "run", **ARGS)
    monkeypatch.setattr(train_loop, "fault_point", lambda name: None)
    return tmp_path / "run"


def test_a_killed_wrapped_run_resumes_to_the_bits_of_one_never_stopped(tmp_path, killed):
    ref_model = TinyVAE()
    ref = elbolab.train_model(ref_model, data(), tmp_path / "ref", **ARGS)
    ck = load_checkpoint(killed / "checkpoint.pt")
    assert (ck["epoch"], ck["step"], ck["position"]["next_batch"]) == (1, 6, 2)
    model = TinyVAE()
    # the same call again continues (TensorBoard may be switched on at a resume: it changes no bits)
    bounds = elbolab.train_model(model, data(), killed, **ARGS, **{"train.tensorboard": True})
    assert bounds == ref and len(bounds) == 3
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the folder: what a native run's holds, the model named in run.json, reloaded in one call
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "finished" and info["wrapped_model"]["class"].endswith("TinyVAE")
    assert info["wrapped_model"]["tensors"]["enc.weight"] == "float32[4, 6]"
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["train_bound"] for r in rows] == ref
    files = {p.name for p in killed.iterdir()}
    assert {"config.yaml", "checkpoint.pt", "model.safetensors", "environment.json"} <= files
    assert list((killed / "tensorboard").glob("events.out.tfevents.*"))
    run = load_run(killed, model=TinyVAE(seed=5))
    for (name, a), b in zip(model.state_dict().items(), run.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not run.model.training and run.metrics == rows


@pytest.mark.parametrize("change, named", [
    (dict(model=TinyVAE(latent=3)), "model tensor dec.weight: float32[6, 2] -> float32[6, 3]"),
    (dict(x=data(seed=2)), "trained on other data (in-memory train SHA-256"),
    (dict(epochs=4), "another config (train.epochs: 3 -> 4)"),
])
def test_another_model_data_or_config_is_refused_naming_it(killed, change, named):
    before = {p.name: p.read_bytes() for p in killed.iterdir() if p.is_file()}
    args = {**ARGS, **{k: v for k, v in change.items() if k not in ("model", "x")}}
    with pytest.raises(RunError, match=r"^[^\n]*$") as e:
        elbolab.train_model(change.get("model", TinyVAE()), change.get("x", data()), killed, **args)
    assert named in str(e.value)
    assert {p.name: p.read_bytes() for p in killed.iterdir() if p.is_file()} == before  # untouched


def test_reloading_needs_a_model_of_its_kind(killed, tmp_path):
    with pytest.raises(RunError, match=r"did not build \(.*TinyVAE\); pass one of its kind"):
        load_run(killed, weights="last")
    with pytest.raises(RunError, match="enc.weight: float32.4, 6. -> float32.6, 6."):
        load_run(killed, weights="last", model=TinyVAE(latent=3))
    assert torch.equal(load_run(killed, weights="last", model=TinyVAE()).model.enc.weight,
                       load_checkpoint(killed / "checkpoint.pt")["model"]["enc.weight"])
    # and a native run folder is not taken over by a wrapped model
    elbolab.train(data(), tmp_path / "native", **{"train.epochs": 1, "model.latent_dim": 2, "model.hidden": [4],
                                                   "train.monitor_every": 0, "train.progress": False})
    with pytest.raises(RunError, match="holds a run of elbolab's own model"):
        load_run(tmp_path / "native", model=TinyVAE())


def test_model_and_data_keys_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.latent_dim: train_model trains the model and data it is given"):
        elbolab.train_model(TinyVAE(), data(), tmp_path / "run", **{"model.latent_dim": 3})
    assert not (tmp_path / "run").exists()


def test_without_a_folder_it_trains_as_with_one(tmp_path):
    a, b = TinyVAE(), TinyVAE()
    assert elbolab.train_model(a, data(), **ARGS) == elbolab.train_model(b, data(), tmp_path / "run", **ARGS)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not list(tmp_path.glob("elbolab-train-model-*"))


CHILD = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
import elbolab
from test_train_model_runs import ARGS, TinyVAE, data
torch.set_num_threads(1)
elbolab.train_model(TinyVAE(), data(), sys.argv[1], **ARGS)
"""


@pytest.mark.slow  # a child process of its own (the kill is real); the in-process kill above is the fast twin
@pytest.mark.usefixtures("restore_threads")
def test_a_sigkilled_wrapped_run_resumes_to_the_same_bits(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from elbolab.files import TEST_STOP_ENV

    env = {**os.environ, TEST_STOP_ENV: "step#8"}  # frozen after step 8, then killed: step 6's checkpoint is the last
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "run"), str(Path(__file__).parent)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), proc.stderr.read() if proc.stderr else status
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "running"
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 6
    torch.set_num_threads(1)
    ref_model, model = TinyVAE(), TinyVAE()
    ref = elbolab.train_model(ref_model, data(), tmp_path / "ref", **ARGS)
    assert elbolab.train_model(model, data(), tmp_path / "run", **ARGS) == ref
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
