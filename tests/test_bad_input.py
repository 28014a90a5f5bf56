"""Bad input gets one line naming what is wrong, a non-zero exit, and nothing is overwritten;
loading never executes code from a file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import elbolab.files as files
import elbolab.training as training
from elbolab import cli
from elbolab.config import ConfigError, RunConfig, load_config
from elbolab.runs import RunError, load_checkpoint, load_run

TINY = ["model.hidden=[8]", "model.latent_dim=2", "train.epochs=2", "train.batch_size=1000",
        "train.progress=false", "train.checkpoint_minutes=0", "train.threads=1"]


def train_args(out: Path, *settings: str) -> list[str]:
    return ["train", "--no-eval", "--out", str(out), *(a for s in (*TINY, *settings) for a in ("--set", s))]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


pytestmark = pytest.mark.usefixtures("restore_threads")


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny run, and one killed in epoch 2 (checkpoint from the end of epoch 1)."""
    base = tmp_path_factory.mktemp("runs")
    assert cli.main(train_args(base / "finished")) == 0
    mp = pytest.MonkeyPatch()
    steps = {"n": 0}

    def crash(name: str) -> None:
        steps["n"] += name == "step"
        if steps["n"] == 15:
            raise Crash

    mp.setattr(training, "fault_point", crash)
    try:
        with pytest.raises(Crash):
            cli.main(train_args(base / "unfinished"))
    finally:
        mp.undo()
    return {"finished": base / "finished", "unfinished": base / "unfinished"}


@pytest.fixture
def unfinished(runs, tmp_path) -> Path:
    return Path(shutil.copytree(runs["unfinished"], tmp_path / "unfinished"))


@pytest.fixture
def finished(runs, tmp_path) -> Path:
    return Path(shutil.copytree(runs["finished"], tmp_path / "finished"))


# --- config ---------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "expected"), [
    ("train.lerning_rate=1", "train.lerning_rate: unknown key"),
    ("train.lr=-0.001", "train.lr: must be a finite number > 0"),
    ("train.lr=nan", "train.lr: must be a finite number > 0"),
    ("objective.k=0", "objective.k: must be >= 1"),
    ("model.latent_dim=0", "model.latent_dim: must be >= 1"),
    ("train.epochs=many", "train.epochs: expected an integer"),
    ("model.hidden=7", "model.hidden: expected a list"),
    ("model.prior.name=vamprior", "model.prior.name: unknown prior 'vamprior' (did you mean 'vampprior'?)"),
    ("objective.name=iwea", "objective.name: unknown objective 'iwea' (did you mean 'iwae'?)"),
    ("train.nonfinite=ignore", "train.nonfinite: must be 'skip' or 'stop'"),
    ("train.checkpoint_minutes=-1", "train.checkpoint_minutes: must be a finite number >= 0"),
    ("train.max_nonfinite_skips=-1", "train.max_nonfinite_skips: must be >= 0"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, capsys, setting, expected):
    out = tmp_path / "run"
    code, err = run_cli(train_args(out, setting), capsys)
    assert code == cli.EXIT_BAD_INPUT == 2
    assert expected in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["train", "--out", str(out), "--device", "cuda"], capsys)
    assert code == 2
    assert err == "elbolab: error: train.device: 'cuda' but CUDA is not available on this machine; use cpu\n"
    assert not out.exists()
    code, err = run_cli(["evaluate", str(out), "--device", "cuda:1"], capsys)
    assert code == 2 and "--device: 'cuda:1' but CUDA is not available" in err and err.count("\n") == 1
    code, err = run_cli(["bench", "--device", "gpu"], capsys)
    assert code == 2 and "--device: 'gpu' is not a device; use cpu, cuda, cuda:N or auto" in err


def test_unknown_key_in_a_file_gets_did_you_mean(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("trian:\n  epochs: 3\n")
    code, err = run_cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "trian: unknown key (did you mean 'train'?)" in err and str(tmp_path / "c.yaml") in err


def test_a_prior_the_model_cannot_take_is_a_config_error(tmp_path, monkeypatch, capsys):
    from elbolab import priors

    def needs_two_layers(cfg, latent_dim, data_dim, train_data):
        raise ValueError("this prior needs a two-layer model")

    monkeypatch.setitem(priors.PRIORS, "two-layer-only", needs_two_layers)
    code, err = run_cli(train_args(tmp_path / "run", "model.prior.name=two-layer-only"), capsys)
    assert code == 2 and "model: cannot build 'one-layer'" in err and "needs a two-layer model" in err
    assert not (tmp_path / "run").exists()


def test_yaml_config_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")
    assert not marker.exists()


# --- run folders ----------------------------------------------------------------

def test_other_elbolab_version_is_refused(finished, unfinished, capsys):
    for run in (finished, unfinished):
        info = json.loads((run / "run.json").read_text())
        info["elbolab"] = "9.0.0"
        (run / "run.json").write_text(json.dumps(info))
    before = snapshot(unfinished)
    code, err = run_cli(["evaluate", str(finished)], capsys)
    assert code == 2 and "written by elbolab 9.0.0" in err and err.count("\n") == 1
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and "written by elbolab 9.0.0" in err and "cannot be resumed" in err
    assert snapshot(unfinished) == before


def test_weights_of_another_architecture_are_refused(finished, capsys):
    text = (finished / "config.yaml").read_text().replace("- 8\n", "- 9\n")
    (finished / "config.yaml").write_text(text)
    assert load_config(finished / "config.yaml").model.hidden == (9,)
    code, err = run_cli(["evaluate", str(finished)], capsys)
    assert code == 2 and "weights do not fit the configured model" in err and err.count("\n") == 1


def test_missing_and_truncated_weights(finished, capsys):
    weights = finished / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="truncated or not safetensors"):
        load_run(finished)
    code, err = run_cli(["evaluate", str(finished)], capsys)
    assert code == 2 and "model.safetensors" in err and err.count("\n") == 1
    weights.unlink()
    with pytest.raises(RunError, match="weights file missing"):
        load_run(finished)


def test_truncated_checkpoint_is_refused_on_resume(unfinished, capsys):
    ckpt = unfinished / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = snapshot(unfinished)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and "refused or unreadable checkpoint" in err and err.count("\n") == 1
    assert snapshot(unfinished) == before


def test_checkpoint_of_another_architecture_is_refused_on_resume(unfinished, capsys):
    ckpt = torch.load(unfinished / "checkpoint.pt", weights_only=True)
    ckpt["model"]["encoder.0.weight"] = torch.zeros(9, 784)  # a 9-unit layer where the config says 8
    torch.save(ckpt, unfinished / "checkpoint.pt")
    before = snapshot(unfinished)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and "checkpoint.pt: does not fit the configured model" in err and err.count("\n") == 1
    assert snapshot(unfinished) == before


def test_resume_may_move_to_another_device_and_data_dir(unfinished, capsys):
    """A run killed on one machine continues on another: --device and --data-dir apply on resume."""
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished), "--device", "auto",
                         "--data-dir", str(unfinished)], capsys)
    assert code == 0, err
    assert json.loads((unfinished / "run.json").read_text())["status"] == "finished"
    if not torch.cuda.is_available():
        code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished), "--device", "cuda"], capsys)
        assert code == 2 and "train.device: 'cuda' but CUDA is not available" in err


@pytest.mark.parametrize("tag", [True, False], ids=["tagged", "untagged"])
def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu(unfinished, capsys, caplog, tag):
    """The binarization generator lives on the training device: a GPU checkpoint holds a 16-byte
    CUDA generator state, which a CPU generator refuses (the traceback a GPU-to-CPU resume gave,
    found on an H200). It restarts from its seed with a warning instead; checkpoints written
    before the device was recorded (untagged) are caught by the refusal itself."""
    path = unfinished / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["rng"]["batcher"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA philox state: seed, offset
    if tag:
        state["rng"]["batcher_device"] = "cuda"
    else:
        state["rng"].pop("batcher_device", None)
    torch.save(state, path)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "binarization stream cannot continue on cpu" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert ("it was saved on cuda" if tag else "Expected a CPUGeneratorImplState") in warned[0]
    assert json.loads((unfinished / "run.json").read_text())["status"] == "finished"


def test_resume_and_another_out_folder_conflict(unfinished, tmp_path, capsys):
    code, err = run_cli(["train", "--resume", str(unfinished), "--out", str(tmp_path / "elsewhere")], capsys)
    assert code == 2 and "a resumed run stays in its own folder" in err
    assert not (tmp_path / "elsewhere").exists()


def test_other_config_in_out_folder_is_refused_untouched(unfinished, finished, capsys):
    before = snapshot(unfinished)
    code, err = run_cli(train_args(unfinished, "train.lr=0.002"), capsys)
    assert code == 2 and "holds a run of another config (train.lr: 0.001 -> 0.002)" in err
    assert snapshot(unfinished) == before
    before = snapshot(finished)
    code, err = run_cli(train_args(finished), capsys)
    assert code == 2 and "already holds a finished run" in err
    assert snapshot(finished) == before


def test_non_run_folder_is_not_used_as_out(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = run_cli(train_args(tmp_path), capsys)
    assert code == 2 and "not an empty folder or an elbolab run" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


class Evil:
    """Unpickling this runs a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_checkpoint_is_refused_and_never_run(unfinished, tmp_path, capsys, writer):
    # the payload is real: plain unpickling does run it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Evil(proof)))
    assert proof.exists()

    marker = tmp_path / "pwned"
    ckpt = unfinished / "checkpoint.pt"
    if writer == "torch.save":
        torch.save({"model": Evil(marker), "elbolab": "0.1.0"}, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    before = snapshot(unfinished)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and "refused or unreadable checkpoint" in err and err.count("\n") == 1
    with pytest.raises(RunError, match="refused"):
        load_run(unfinished, weights="last")
    assert not marker.exists()
    assert snapshot(unfinished) == before


# --- output folder that cannot be written -----------------------------------------

def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_full_disk_keeps_previous_checkpoint_then_resume_finishes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = training.Trainer.save_checkpoint
    calls = {"n": 0}

    def save(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the disk fills up before the end-of-epoch-2 checkpoint
            monkeypatch.setattr(files.os, "fsync", _raise(errno.ENOSPC))
        real_save(self)

    monkeypatch.setattr(training.Trainer, "save_checkpoint", save)
    code, err = run_cli(train_args(out), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device (ENOSPC)" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the previous one, intact
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    code, err = run_cli(["train", "--no-eval", "--resume", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_read_only_folder_changes_nothing(unfinished, monkeypatch, capsys):
    # tests run as root, where chmod does not stop writes: refuse file creation instead
    monkeypatch.setattr(files.tempfile, "mkstemp", _raise(errno.EACCES))
    real_open = files.Path.open

    def open_read_only(self, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(files.Path, "open", open_read_only)
    before = snapshot(unfinished)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and "Permission denied (EACCES)" in err and err.count("\n") == 1
    assert snapshot(unfinished) == before


def test_config_error_is_raised_by_from_dict_too():
    with pytest.raises(ConfigError, match=r"train\.batchsize: unknown key \(did you mean 'batch_size'\?\)"):
        RunConfig.from_dict({"train": {"batchsize": 10}})
