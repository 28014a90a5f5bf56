"""No lost training: real processes are SIGKILLed mid-epoch, killed inside a checkpoint
write and interrupted with Ctrl-C; each resumed run must end bit-identical (weights and
metrics) to one that was never interrupted."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elbolab import cli
from elbolab.files import TEST_STOP_ENV
from elbolab.runs import load_checkpoint

#: 2 epochs x 50 batches of the embedded data; checkpoints at steps 20, 40, 50 (epoch end), 60, ...
SETTINGS = [
    "model.hidden=[50]", "model.latent_dim=10", "objective.k=2", "objective.warmup_epochs=2",
    "train.epochs=2", "train.batch_size=200", "train.schedule=iwae", "train.early_stopping_patience=5",
    "train.threads=1", "train.progress=false", "train.checkpoint_minutes=0", "train.checkpoint_steps=20",
]

#: real processes trained, killed and resumed: the slow tier (an in-process resume stays in the fast one,
#: tests/test_training_faults.py)
pytestmark = pytest.mark.slow


def elbolab_train(*args: str, stop_at: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "elbolab.cli", "train", "--no-eval", *args]
    env = dict(os.environ)
    env.pop(TEST_STOP_ENV, None)
    if stop_at:
        env[TEST_STOP_ENV] = stop_at
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fresh_args(out: Path) -> list[str]:
    return ["--out", str(out), *(a for s in SETTINGS for a in ("--set", s))]


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{out}\n{err}"
    return err


def wait_until_frozen(proc: subprocess.Popen) -> None:
    """Block until the child froze itself at its fault point (SIGSTOP)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"child ended before its fault point: status {status}"


def outcome(run: Path) -> tuple[bytes, bytes, list[dict]]:
    """Final weights, best weights and metrics (minus wall-clock seconds) of a run folder."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
        r.pop("monitor_seconds", None)
    return (run / "model.safetensors").read_bytes(), (run / "best.safetensors").read_bytes(), rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[bytes, bytes, list[dict]]:
    run = tmp_path_factory.mktemp("ref") / "run"
    finish(elbolab_train(*fresh_args(run)))
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    return outcome(run)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference):
    run = tmp_path / "run"
    proc = elbolab_train(*fresh_args(run), stop_at="step#75")  # epoch 2, batch 25
    try:
        wait_until_frozen(proc)
        ckpt = load_checkpoint(run / "checkpoint.pt")  # the mid-epoch one from step 60
        assert (ckpt["step"], ckpt["epoch"], ckpt["position"]["next_batch"]) == (60, 1, 10)
        assert ckpt["position"]["order"].shape == (10_000,)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    finish(elbolab_train("--resume", str(run)))
    got = outcome(run)
    assert got[0] == reference[0], "final weights differ from the uninterrupted run"
    assert got[1] == reference[1], "best-on-validation weights differ"
    assert got[2] == reference[2], "metrics differ"


def test_kill_inside_checkpoint_write_keeps_previous_checkpoint(tmp_path, reference):
    run = tmp_path / "run"
    # the 3rd checkpoint write is the end of epoch 1 (step 50); it freezes half-written
    proc = elbolab_train(*fresh_args(run), stop_at="write:checkpoint.pt#3")
    try:
        wait_until_frozen(proc)
        partial = list(run.glob(".checkpoint.pt.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        with pytest.raises(Exception):  # noqa: B017 - half a zip archive must not load
            torch.load(partial[0], weights_only=True)
        ckpt = load_checkpoint(run / "checkpoint.pt")
        assert ckpt["step"] == 40 and ckpt["epoch"] == 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 40  # intact after the kill
    # same command again: the unfinished run of the same config is continued automatically
    err = finish(elbolab_train(*fresh_args(run)))
    assert not list(run.glob(".*.tmp")), "stale temp file left behind"
    assert outcome(run) == reference, err


def test_ctrl_c_writes_checkpoint_exits_130_and_resumes_exactly(tmp_path, reference):
    run = tmp_path / "run"
    proc = elbolab_train(*fresh_args(run), stop_at="step#65")
    wait_until_frozen(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    err = finish(proc, expect=130)
    assert "interrupted" in err and "Traceback" not in err
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert (ckpt["step"], ckpt["position"]["next_batch"]) == (65, 15)  # written at the Ctrl-C, not at step 60
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    finish(elbolab_train("--resume", str(run)))
    assert outcome(run) == reference


@pytest.fixture(scope="module")
def reference_seed1(tmp_path_factory) -> tuple[bytes, bytes, list[dict]]:
    run = tmp_path_factory.mktemp("ref1") / "run"
    finish(elbolab_train(*fresh_args(run), "--set", "train.seed=1"))
    return outcome(run)


def test_sigkill_of_a_stacked_sweep_then_resume_equals_each_run_alone(tmp_path, reference, reference_seed1):
    """Two seeds trained as one stacked model, SIGKILLed mid-epoch, resumed with --resume: each
    run's weights and metrics are those of the same run trained alone, uninterrupted."""
    sweep = tmp_path / "sweep"
    proc = elbolab_train(*fresh_args(sweep), "--sweep", "train.seed=0,1", stop_at="step#75")
    try:
        wait_until_frozen(proc)
        for name in ("seed=0", "seed=1"):
            ckpt = load_checkpoint(sweep / name / "checkpoint.pt")  # each run's own mid-epoch checkpoint
            assert (ckpt["step"], ckpt["epoch"], ckpt["position"]["next_batch"]) == (60, 1, 10)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finish(elbolab_train("--resume", str(sweep)))
    assert outcome(sweep / "seed=0") == reference
    assert outcome(sweep / "seed=1") == reference_seed1


# --- creating the run folder, one owner per run ------------------------------------------

#: one epoch of 10 steps of a tiny model on the embedded data: seconds, not minutes
TINY = ["model.hidden=[8]", "model.latent_dim=2", "train.epochs=1", "train.batch_size=1000", "train.threads=1",
        "train.progress=false", "train.checkpoint_minutes=0", "train.checkpoint_steps=3"]


def tiny_args(out: Path) -> list[str]:
    return ["--out", str(out), *(a for s in TINY for a in ("--set", s))]


def in_process(*argv: str) -> int:
    """The CLI in this process (cheaper than a new one where the test needs no second process)."""
    threads = torch.get_num_threads()
    try:
        return cli.main(list(argv))
    finally:
        torch.set_num_threads(threads)


def assert_nothing_or_resumable(run: Path) -> None:
    """What a kill may leave: no run folder, or one whose run.json says what to continue."""
    if run.exists():
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "running" and (run / "config.yaml").is_file()


@pytest.mark.parametrize("point", ["write:config.yaml#1", "write:environment.json#1", "write:run.json#1",
                                   "create:rename#1"])
def test_kill_while_the_run_folder_is_created_then_the_same_command_runs(tmp_path, point):
    run = tmp_path / "run"
    proc = elbolab_train(*tiny_args(run), stop_at=point)
    try:
        wait_until_frozen(proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert_nothing_or_resumable(run)
    assert in_process("train", "--no-eval", *tiny_args(run)) == 0  # the very same command
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "a half-built folder was left beside the run"


def test_one_owner_per_run_and_a_killed_owner_never_blocks(tmp_path):
    """A second process on a run that one is training is refused in one line (fresh start with the
    same --out, or --resume); once the owner is SIGKILLed, --resume takes the run over at once."""
    run = tmp_path / "run"
    owner = elbolab_train(*tiny_args(run), stop_at="step#4")  # holds the run, frozen mid-epoch
    try:
        wait_until_frozen(owner)
        err = finish(elbolab_train(*tiny_args(run)), expect=2)  # a second process, same command
        assert "in use by another elbolab process" in err and err.count("\n") == 1, err
        assert in_process("train", "--no-eval", "--resume", str(run)) == 2  # any other owner, this one too
        assert load_checkpoint(run / "checkpoint.pt")["step"] == 3  # untouched by the refused ones
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert in_process("train", "--no-eval", "--resume", str(run)) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # trained once, not once per process


def test_default_run_folders_are_unique_for_runs_started_in_the_same_second(tmp_path):
    """Three `elbolab train &` with no --out, their clock frozen at the same second: three folders."""
    code = ("import sys, time; time.strftime = lambda *a: '20250101-000000'; from elbolab.cli import main; "
            f"sys.exit(main(['train', '--no-eval', *{[a for s in TINY for a in ('--set', s)]!r}]))")
    env = {k: v for k, v in os.environ.items() if k != TEST_STOP_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        finish(p)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 3 and all("20250101-000000" in r.name for r in runs)
    for r in runs:
        assert json.loads((r / "run.json").read_text())["status"] == "finished"
        assert len((r / "metrics.jsonl").read_text().splitlines()) == 1


def test_ctrl_c_of_a_default_folder_run_prints_the_line_that_continues_it(tmp_path, reference):
    """Without --out each command makes a new folder, so "rerun the same command" would start
    over: the message names the exact command, and running it as printed finishes the run."""
    settings = [a for s in SETTINGS for a in ("--set", s)]
    cmd = [sys.executable, "-m", "elbolab.cli", "train", "--no-eval", *settings]
    env = {**os.environ, TEST_STOP_ENV: "step#65"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_frozen(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    err = finish(proc, expect=130)
    said = err.strip().splitlines()[-1]
    assert said.startswith("elbolab: interrupted;") and "rerun the same command" not in said, err
    line = said.split("continue with: ", 1)[1]
    argv = shlex.split(line)
    assert argv[:3] == ["elbolab", "train", "--resume"] and argv[3].startswith("runs/"), line
    env.pop(TEST_STOP_ENV)
    again = subprocess.run([sys.executable, "-m", "elbolab.cli", *argv[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "continuing the unfinished run" in again.stdout and "warning" not in again.stderr  # ordinary
    run = tmp_path / argv[3]
    logged = sum(json.loads(r)["seconds"] for r in (run / "metrics.jsonl").read_text().splitlines())
    assert int(again.stdout.split("trained in ")[1].split(" s")[0]) >= int(logged), again.stdout
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name], "the resume made another folder"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert outcome(run) == reference
