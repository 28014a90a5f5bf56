"""Sweeps, run folders and the Python API under faults: re-issued sweeps, kills before a later
stack's folders exist, refused preflights, an --out that is a run, a file or read-only, the
memory of a stack, edited configs, other data, links out of the folder, stale temp files, and
checkpoints that two identical runs write alike. Kills are real (a child process frozen at a
fault point, then SIGKILLed), as in tests/test_crash_resume.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trainhelp import fit

import elbolab
import elbolab.preflight as preflight
from elbolab import cli
from elbolab.config import RunConfig
from elbolab.files import TEST_STOP_ENV
from elbolab.models import build_model
from elbolab.runs import RunError, load_run
from elbolab.training import RunState

pytestmark = pytest.mark.usefixtures("restore_threads")

#: one epoch of 10 steps of a tiny model on the embedded data
TINY = ["model.hidden=[8]", "model.latent_dim=2", "train.epochs=1", "train.batch_size=1000", "train.threads=1",
        "train.progress=false", "train.checkpoint_minutes=0", "train.checkpoint_steps=3"]


def sets(*settings: str) -> list[str]:
    return [a for s in (*TINY, *settings) for a in ("--set", s)]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def child(*args: str, stop_at: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != TEST_STOP_ENV}
    e.update(env or {})
    if stop_at:
        e[TEST_STOP_ENV] = stop_at
    return subprocess.Popen([sys.executable, "-m", "elbolab.cli", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_at_fault_point(proc: subprocess.Popen) -> None:
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"child ended before its fault point: status {status}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{out}\n{err}"
    return err


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def status(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["status"]


# --- sweeps: re-issued, resumed, refused ----------------------------------------------------

def test_a_reissued_sweep_of_another_config_is_refused_naming_the_keys(tmp_path, capsys):
    """Item 1: the same sweep with another latent size into a finished sweep folder is refused in one
    line naming the key (it used to exit 0 printing the old runs' results); the same config is fine."""
    sweep = tmp_path / "sweep"
    assert cli.main(["train", "--no-eval", "--out", str(sweep), *sets(), "--sweep", "train.seed=0,1"]) == 0
    before = snapshot(sweep)
    code, err = run_cli(["train", "--no-eval", "--out", str(sweep), *sets("model.latent_dim=3"),
                         "--sweep", "train.seed=0,1"], capsys)
    assert code == 2 and "model.latent_dim: 2 -> 3" in err and err.count("\n") == 1, err
    assert snapshot(sweep) == before
    stale = sweep / ".sweep.json.k1ll3d.tmp"  # what a kill inside the write of sweep.json leaves (item 23)
    stale.write_text("{")
    assert cli.main(["train", "--no-eval", "--out", str(sweep), *sets(), "--sweep", "train.seed=0,1"]) == 0
    assert not stale.exists()


def test_resume_after_a_kill_before_a_later_stack_existed(tmp_path):
    """Item 8: two stacks (latent sizes 2 and 3); a kill in the first, before the second's folder
    exists: `--resume SWEEP` finishes both, as the original command would."""
    sweep = tmp_path / "sweep"
    kill_at_fault_point(child("train", "--no-eval", "--out", str(sweep), *sets(), "--sweep",
                              "model.latent_dim=2,3", stop_at="step#4"))
    assert (sweep / "latent_dim=2" / "checkpoint.pt").exists() and not (sweep / "latent_dim=3").exists()
    finish(child("train", "--no-eval", "--resume", str(sweep)))
    assert [status(sweep / n) for n in ("latent_dim=2", "latent_dim=3")] == ["finished", "finished"]


def test_a_sweep_refused_by_preflight_writes_nothing(tmp_path, capsys):
    """Item 9: a sweep preflight refuses (more threads than cores) leaves no folder behind, so the
    corrected command, another sweep, runs into the same --out."""
    sweep = tmp_path / "sweep"
    code, err = run_cli(["train", "--no-eval", "--out", str(sweep), *sets(f"train.threads={os.cpu_count() + 1}"),
                         "--sweep", "model.latent_dim=2,3"], capsys)
    assert code == 2 and "train.threads" in err and err.count("\n") == 1, err
    assert not sweep.exists()
    assert cli.main(["train", "--no-eval", "--out", str(sweep), *sets(), "--sweep", "train.seed=0,1"]) == 0


def test_a_stack_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """Item 11: each run of a stack of four fits alone, the stack does not: refused in one line
    naming the stack, nothing written (each run used to be checked alone and pass)."""
    cfg = RunConfig().with_overrides([s for s in TINY])
    model = build_model(cfg.model, 784, torch.full((10, 784), 0.5))
    one = preflight.estimate_memory(cfg, model, 784, n_valid=10000).peak
    monkeypatch.setattr(preflight, "available_memory", lambda device: 2 * one)
    sweep = tmp_path / "sweep"
    code, err = run_cli(["train", "--no-eval", "--out", str(sweep), *sets(), "--sweep", "train.seed=0,1,2,3"], capsys)
    assert code == 2 and "stacked training step of 4 runs" in err and err.count("\n") == 1, err
    assert not sweep.exists()
    assert preflight.estimate_memory(cfg, model, 784, n_valid=10000, runs=4).peak > 3 * one


#: one fresh process per measurement, as tests/test_preflight.py measures one run: the growth of
#: the peak resident memory (VmHWM, reset just before) over one stacked step of S runs
MEASURE_STACK = """
import json, sys, torch
from elbolab.config import RunConfig
from elbolab.fastpaths import retain_freed_memory
from elbolab.models import build_model
from elbolab.objectives import make_objective, objective_plan
from elbolab.optimizers import make_optimizer
from elbolab.preflight import estimate_memory
from elbolab.training import StepRun, make_step
torch.set_num_threads(1)
retain_freed_memory()
S = int(sys.argv[2])
cfg = RunConfig().with_overrides(json.loads(sys.argv[1]))
x = torch.bernoulli(torch.full((cfg.train.batch_size, 784), 0.3))
plan, estimator = objective_plan(cfg.objective)
runs = []
for s in range(S):
    model = build_model(cfg.model, 784, x)
    runs.append(StepRun(model, make_optimizer(model, cfg.train, torch.device("cpu")), make_objective(cfg.objective),
                         plan, estimator, torch.Generator().manual_seed(s)))
estimate = estimate_memory(cfg, runs[0].model, 784, runs=S)
stack = make_step(runs)  # as training builds it: a run alone takes the plain step
stack.step(torch.stack([x[:2]] * S), [1.0] * S)  # gradients and Adam's state exist before the measurement
def kib(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
rss = kib("VmRSS:")
stack.step(torch.stack([x] * S), [1.0] * S)
print(json.dumps({"estimate": estimate.peak, "what": estimate.what, "measured": kib("VmHWM:") - rss}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures resident memory through /proc")
@pytest.mark.parametrize("runs", [1, 4])
def test_stack_memory_estimate_is_within_a_factor_two_of_the_measured_peak(runs):
    """Item 11: the default one-layer model at k = 50, batch 100, stacked S = 1 and 4 runs: the
    estimate of the stacked step is within 2x of a fresh process's measured peak growth."""
    over = {"objective.k": 50, "eval.batch_size": 1, "eval.chunk_size": 1}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", MEASURE_STACK, json.dumps(over), str(runs)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert "training step" in r["what"] and r["measured"] > 20e6 * runs, r
    assert 0.5 <= r["estimate"] / r["measured"] <= 2.0, r


# --- sweeps: what --out may be ---------------------------------------------------------------

def test_a_sweep_into_a_single_runs_folder_is_refused_untouched(tmp_path, capsys):
    """Item 10: `--sweep --out RUN` on a finished single run: one line, the folder unchanged."""
    run = tmp_path / "run"
    assert cli.main(["train", "--no-eval", "--out", str(run), *sets()]) == 0
    before = snapshot(run)
    code, err = run_cli(["train", "--no-eval", "--out", str(run), *sets(), "--sweep", "train.seed=0,1"], capsys)
    assert code == 2 and "holds a single run" in err and err.count("\n") == 1, err
    assert snapshot(run) == before


def test_a_sweep_out_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    """Item 16: --out naming a file, or a folder that cannot be created (read-only): one line, exit 2."""
    f = tmp_path / "file"
    f.write_text("mine")
    code, err = run_cli(["train", "--no-eval", "--out", str(f), *sets(), "--sweep", "train.seed=0,1"], capsys)
    assert code == 2 and str(f) in err and "is a file" in err and err.count("\n") == 1, err
    assert f.read_text() == "mine"

    def read_only(self, *args, **kwargs):  # tests run as root, where chmod does not stop writes
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = run_cli(["train", "--no-eval", "--out", str(tmp_path / "ro" / "sweep"), *sets(),
                         "--sweep", "train.seed=0,1"], capsys)
    assert code == 2 and "Read-only file system" in err and err.count("\n") == 1, err


# --- run folders: links out of the folder, the recorded config, the data ------------------------

def _unfinished_run(out: Path, *settings: str) -> Path:
    """A run killed in its second epoch (a real SIGKILL at step 14, checkpoint at step 12)."""
    kill_at_fault_point(child("train", "--no-eval", "--out", str(out), *sets("train.epochs=2", *settings),
                              stop_at="step#14"))
    assert status(out) == "running"
    return out


def test_nothing_outside_the_run_folder_is_written(tmp_path, capsys):
    """Item 24: a metrics.jsonl that links to a file outside the run folder is refused on resume in
    one line, and the file outside is untouched (resume used to append to it)."""
    run = _unfinished_run(tmp_path / "run")
    outside = tmp_path / "outside.jsonl"
    outside.write_text((run / "metrics.jsonl").read_text())
    before = outside.read_bytes()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    code, err = run_cli(["train", "--no-eval", "--resume", str(run)], capsys)
    assert code == 2 and "metrics.jsonl: is a symbolic link" in err and err.count("\n") == 1, err
    assert outside.read_bytes() == before


def test_a_sweep_entry_outside_the_sweep_is_refused(tmp_path, capsys):
    """Item 24: a sweep.json whose entry is '..' does not resume the run enclosing the sweep folder."""
    run = tmp_path / "run"
    assert cli.main(["train", "--no-eval", "--out", str(run), *sets()]) == 0
    inner = run / "sweep"
    inner.mkdir()
    (inner / "sweep.json").write_text(json.dumps({"sweep": {}, "runs": [".."]}))
    before = snapshot(run)
    code, err = run_cli(["train", "--no-eval", "--resume", str(inner)], capsys)
    assert code == 2 and "sweep.json" in err and err.count("\n") == 1, err
    assert snapshot(run) == before


def test_a_hand_edited_config_of_a_finished_run_is_refused(tmp_path, capsys):
    """Item 3: config.yaml edited in a finished run (activation tanh -> relu): `evaluate` refuses in
    one line naming the file instead of scoring another model; load_run refuses too."""
    run = tmp_path / "run"
    assert cli.main(["train", "--no-eval", "--out", str(run), *sets("model.activation=tanh")]) == 0
    text = (run / "config.yaml").read_text()
    assert "activation: tanh" in text
    (run / "config.yaml").write_text(text.replace("activation: tanh", "activation: relu"))
    code, err = run_cli(["evaluate", str(run), "--k", "10"], capsys)
    assert code == 2 and f"{run / 'config.yaml'}: edited" in err and err.count("\n") == 1, err
    with pytest.raises(RunError, match="config.yaml: edited"):
        load_run(run)
    (run / "config.yaml").write_text(text)
    assert load_run(run).config.model.activation == "tanh"


def test_the_api_refuses_to_continue_a_run_on_other_data(tmp_path):
    """Item 2: elbolab.train(x2, out=R) on a run killed while training on x1 (same N) is refused,
    naming both checksums; run.json keeps recording x1."""
    out = tmp_path / "run"
    x1 = (np.random.default_rng(1).random((300, 784)) < 0.3).astype(np.uint8)
    x2 = (np.random.default_rng(2).random((300, 784)) < 0.3).astype(np.uint8)
    np.save(tmp_path / "x1.npy", x1)
    settings = {"model.hidden": [8], "model.latent_dim": 2, "train.epochs": 2, "train.batch_size": 100,
                "train.threads": 1, "train.progress": False, "train.checkpoint_minutes": 0,
                "train.checkpoint_steps": 2, "data.validation": 0}
    code = (f"import numpy, elbolab; elbolab.train(numpy.load({str(tmp_path / 'x1.npy')!r}), out={str(out)!r}, "
            f"**{settings!r})")
    env = {k: v for k, v in os.environ.items() if k != TEST_STOP_ENV}
    kill_at_fault_point(subprocess.Popen([sys.executable, "-c", code], env={**env, TEST_STOP_ENV: "step#3"}))
    info = json.loads((out / "run.json").read_text())
    recorded = info["data_source"]["splits"]["train"]["sha256"]
    with pytest.raises(RunError, match="trained on other data") as e:
        elbolab.train(x2, out=out, **settings)
    assert recorded[:12] in str(e.value) and str(e.value).count("SHA-256") == 1 and "given" in str(e.value)
    assert json.loads((out / "run.json").read_text())["data_source"] == info["data_source"]
    run = elbolab.train(x1, out=out, **settings)  # the same data continues
    assert run.info["status"] == "finished"


# --- the final evaluation, checkpoints ----------------------------------------------------------

def test_a_rerun_after_a_kill_in_the_final_evaluation_reports_as_an_uninterrupted_run(tmp_path):
    """Item 7: killed inside the write of report.json, the same command evaluates again with
    train.threads (not the process's thread count, here 4), so report.json equals an uninterrupted
    run's; item 23: the temp file the kill left is removed by the rerun."""
    settings = ["model.hidden=[200]", "model.latent_dim=50", "eval.test_images=200", "eval.k_importance=100"]
    assert cli.main(["train", "--out", str(tmp_path / "ref"), *sets(*settings)]) == 0
    run = tmp_path / "run"
    kill_at_fault_point(child("train", "--out", str(run), *sets(*settings), stop_at="write:report.json#1"))
    assert not (run / "report.json").exists() and list(run.glob(".report.json.*.tmp"))
    torch.set_num_threads(4)  # a fresh process's default on a 4-core machine
    assert cli.main(["train", "--out", str(run), *sets(*settings)]) == 0

    def report(r: Path) -> dict:
        d = json.loads((r / "report.json").read_text())
        return {k: v for k, v in d.items() if not k.endswith("seconds")}

    assert report(run) == report(tmp_path / "ref")
    assert not list(run.glob(".*.tmp"))


def test_two_identical_runs_write_identical_checkpoints(tmp_path):
    """Item 26: whatever numpy's and Python's global generators hold, two runs of one config write
    byte-identical checkpoints (their unseeded states used to be stored in them)."""
    cfg = RunConfig().with_overrides(TINY)
    for i in (1, 2):
        np.random.seed(i)
        random.seed(i)
        fit(RunState(cfg, tmp_path / f"r{i}"))
    assert (tmp_path / "r1" / "checkpoint.pt").read_bytes() == (tmp_path / "r2" / "checkpoint.pt").read_bytes()
