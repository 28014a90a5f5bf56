"""Preflight: what this machine cannot run is refused before anything is written; the memory
estimate it refuses with is checked against a measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import elbolab.training.step as train_step
from elbolab import cli
from elbolab.config import RunConfig
from elbolab.data.dataset import ImageDataset
from elbolab.models import build_model
from elbolab.preflight import available_memory, estimate_memory
from elbolab.training import RunState, train_runs

pytestmark = pytest.mark.usefixtures("restore_threads")

TINY = ["model.hidden=[8]", "model.latent_dim=2", "train.epochs=1", "train.batch_size=1000", "train.threads=1",
        "train.progress=false", "train.checkpoint_minutes=0"]


def train_argv(out: Path, *settings: str) -> list[str]:
    return ["train", "--no-eval", "--out", str(out), *(a for s in (*TINY, *settings) for a in ("--set", s))]


#: one fresh process per measurement: its peak resident memory (VmHWM, reset just before the pass
#: through /proc/self/clear_refs) grows by what the pass allocates. (getrusage's maxrss would not
#: do: Linux carries it over from the parent across fork and exec.)
MEASURE = """
import json, sys, torch
from elbolab.config import RunConfig
from elbolab.evaluation import evaluate_bounds
from elbolab.fastpaths import retain_freed_memory
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.optimizers import make_optimizer
from elbolab.preflight import estimate_memory
from elbolab.training import take_step
torch.set_num_threads(1)
retain_freed_memory()
cfg = RunConfig().with_overrides(json.loads(sys.argv[1]))
x = torch.bernoulli(torch.full((500, 784), 0.3))
model = build_model(cfg.model, 784, x)
optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
take_step(model, optimizer, make_objective(RunConfig().with_overrides({"objective.k": 1}).objective), x[:2])
estimate = estimate_memory(cfg, model, 784, n_valid=500 if sys.argv[2] == "valid" else 0)
def kib(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current resident size
rss = kib("VmRSS:")
if sys.argv[2] == "step":
    take_step(model, optimizer, make_objective(cfg.objective), x[: cfg.train.batch_size])
else:
    evaluate_bounds(model, x, k=cfg.objective.k, batch_size=500)
print(json.dumps({"estimate": estimate.peak, "what": estimate.what, "measured": kib("VmHWM:") - rss}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures resident memory through /proc")
@pytest.mark.parametrize(("over", "kind"), [
    ({"objective.k": 50, "eval.batch_size": 1, "eval.chunk_size": 1}, "step"),  # 5,000 sample rows
    ({"objective.k": 50, "train.batch_size": 1, "eval.batch_size": 1, "eval.chunk_size": 1}, "valid"),  # 25,000
])
def test_memory_estimate_is_within_a_factor_two_of_the_measured_peak(over, kind):
    """The default one-layer model (784-200-200-50) at k = 50: a training step of batch 100 and a
    validation pass over 500 images, each measured as the growth of a fresh process's peak RSS."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(over), kind], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert ("training step" if kind == "step" else "validation") in r["what"]
    assert r["measured"] > 20e6  # well above the noise of the allocator
    assert 0.5 <= r["estimate"] / r["measured"] <= 2.0, r


def test_a_step_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    """k = 100,000 x batch 1,000 on a 784-8-2 model: about a terabyte; refused with the estimate and
    the memory available, exit 2, no run folder (so none is left "running")."""
    out = tmp_path / "run"
    code = cli.main(train_argv(out, "objective.k=100000"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "objective.k: a training step (objective.k=100000 x train.batch_size=1000) needs about" in err
    assert "available on cpu; lower objective.k or train.batch_size" in err
    assert not out.exists()


def test_available_memory_reads_proc_meminfo_and_falls_back(monkeypatch):
    import torch

    import elbolab.preflight as pre

    free = available_memory(torch.device("cpu"))
    if Path("/proc/meminfo").exists():
        text = Path("/proc/meminfo").read_text()
        total = next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("MemTotal:"))
        assert free is not None and 0 < free <= total
    real_read = Path.read_text

    def no_proc(self, *a, **k):
        if str(self).startswith(("/proc", "/sys")):
            raise FileNotFoundError(self)
        return real_read(self, *a, **k)

    monkeypatch.setattr(pre.Path, "read_text", no_proc)
    assert available_memory(torch.device("cpu")) is None  # no way to tell: the check is skipped, not failed
    cfg = RunConfig().with_overrides({"objective.k": 100000, "train.batch_size": 1000})
    model = build_model(cfg.model, 784, None)
    pre.check_memory(cfg, model, 784)


def test_estimate_scales_with_k_and_batch_and_leaves_the_rng_alone():
    import torch

    cfg = RunConfig().with_overrides({"eval.batch_size": 1, "eval.chunk_size": 1})
    model = build_model(cfg.model, 784, None)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    small = estimate_memory(cfg, model, 784).peak
    assert torch.equal(torch.get_rng_state(), before)  # the probes draw on a forked stream
    big = estimate_memory(cfg.with_overrides({"objective.k": 50, "train.batch_size": 1000}), model, 784).peak
    params = 4 * 4 * sum(p.numel() for p in model.parameters())  # weights, gradients, Adam's two moments
    # activations grow as the sample rows k x batch (x 100 here) but for the per-image encoder's (x 10)
    assert 10 < (big - params) / (small - params) <= 100


def test_more_threads_than_cpus_is_refused(tmp_path, capsys):
    cpus = os.cpu_count() or 1
    out = tmp_path / "run"
    code = cli.main(train_argv(out, f"train.threads={cpus + 1}"))
    err = capsys.readouterr().err
    assert code == 2 and f"train.threads: {cpus + 1} but this machine has {cpus} CPU cores" in err
    assert not out.exists()


def test_a_run_that_dies_of_an_unexpected_error_is_marked_failed_not_running(tmp_path, monkeypatch):
    """Whatever ends a run (here a RuntimeError from inside a step, as an allocation failure is),
    run.json does not stay "running"."""
    def out_of_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train_step, "take_step", out_of_memory)
    cfg = RunConfig().with_overrides({"model.hidden": [8], "model.latent_dim": 2, "train.epochs": 1,
                                      "train.progress": False, "train.threads": 1})
    import torch

    data = ImageDataset("t", {"train": torch.zeros(50, 16, dtype=torch.uint8)}, (4, 4), binary=True)
    with pytest.raises(RuntimeError, match="can't allocate"):
        train_runs([RunState(cfg, tmp_path / "run", data)])
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "can't allocate memory" in info["error"]
