"""Bad input gets one line naming what is wrong, a non-zero exit, and nothing is overwritten;
loading never executes code from a file."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import elbolab.files as files
import elbolab.training.loop as train_loop
from elbolab import cli
from elbolab.config import ConfigError, RunConfig, load_config
from elbolab.runs import DIGEST, RunError, content_digest, load_checkpoint, load_run
from elbolab.training import RunState

TINY = ["model.hidden=[8]", "model.latent_dim=2", "train.epochs=2", "train.batch_size=1000",
        "train.progress=false", "train.checkpoint_minutes=0", "train.threads=1"]


def train_args(out: Path, *settings: str) -> list[str]:
    return ["train", "--no-eval", "--out", str(out), *(a for s in (*TINY, *settings) for a in ("--set", s))]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def save_signed(state: dict, path: Path) -> None:
    """Write a checkpoint whose recorded checksum matches its contents, as elbolab would write it."""
    state = {k: v for k, v in state.items() if k != DIGEST}
    torch.save({**state, DIGEST: content_digest(state)}, path)


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

    mp.setattr(train_loop, "fault_point", crash)
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
    assert code == 2 and "config.yaml: edited after the run was created" in err and err.count("\n") == 1
    info = json.loads((finished / "run.json").read_text())
    del info["config_sha256"]  # a folder written before config checksums: the weights are what refuse
    (finished / "run.json").write_text(json.dumps(info))
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
    save_signed(ckpt, unfinished / "checkpoint.pt")
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
    save_signed(state, path)
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
    real_save = RunState.save_checkpoint
    calls = {"n": 0}

    def save(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the disk fills up before the end-of-epoch-2 checkpoint
            monkeypatch.setattr(files.os, "fsync", _raise(errno.ENOSPC))
        real_save(self)

    monkeypatch.setattr(RunState, "save_checkpoint", save)
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


# --- creating the run folder on a full disk -------------------------------------------------

@pytest.mark.parametrize("name", ["config.yaml", "environment.json", "run.json"])
def test_full_disk_while_the_run_folder_is_created_leaves_nothing(tmp_path, monkeypatch, capsys, name):
    """ENOSPC at any write of the folder's creation: one line, no folder and nothing beside it;
    the same command then runs once the disk has room."""
    out = tmp_path / "run"
    real_fsync = files.os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):  # its temp file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    code, err = run_cli(train_args(out), capsys)
    assert code == 2 and "No space left on device (ENOSPC)" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    code, err = run_cli(train_args(out), capsys)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_folder_left_by_an_older_elbolab_killed_while_creating_it_is_started_afresh(tmp_path, capsys):
    """Older versions wrote config.yaml and environment.json in place before run.json: a kill
    between left a folder neither a new run nor --resume would take."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("partial")
    (out / "environment.json").write_text("{}")
    code, err = run_cli(train_args(out), capsys)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


# --- corrupted state is detected ------------------------------------------------------------

def flip_bit_in_tensor(path: Path, t: torch.Tensor, bit: int = 30) -> None:
    """Flip one bit of the first element of tensor ``t`` where its bytes sit in the file
    (bit 30 of a float32: the top of the exponent, so the value becomes ~1e38)."""
    data = bytearray(path.read_bytes())
    raw = t.detach().contiguous().reshape(-1).numpy().tobytes()
    at = data.find(raw[:64])
    assert at >= 0, "tensor bytes not found in the file"
    data[at + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_checkpoint_is_refused_on_resume(unfinished, capsys):
    ckpt = unfinished / "checkpoint.pt"
    flip_bit_in_tensor(ckpt, load_checkpoint(ckpt)["model"]["encoder.0.weight"])
    before = snapshot(unfinished)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and f"{ckpt}: checksum mismatch" in err and err.count("\n") == 1, err
    assert snapshot(unfinished) == before


def test_a_flipped_bit_in_the_weights_is_refused(finished, capsys):
    from safetensors.torch import load_file

    weights = finished / "model.safetensors"
    flip_bit_in_tensor(weights, load_file(str(weights))["encoder.0.weight"])
    code, err = run_cli(["evaluate", str(finished)], capsys)
    assert code == 2 and f"{weights}: checksum mismatch" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float16])
def test_weights_of_another_dtype_are_refused_not_cast(finished, capsys, dtype):
    from safetensors.torch import load_file, save_file

    weights = finished / "model.safetensors"
    state = load_file(str(weights))
    state["encoder.0.weight"] = state["encoder.0.weight"].to(dtype)
    save_file(state, str(weights))  # no checksum: as a file from before checksums would be
    code, err = run_cli(["evaluate", str(finished)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{weights}: encoder.0.weight is {dtype}, the model holds torch.float32" in err


def test_non_finite_weights_are_refused_and_json_output_is_always_json(finished, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    import elbolab.cli.evaluate as evaluate_cli

    weights = finished / "model.safetensors"
    good = weights.read_bytes()
    state = load_file(str(weights))
    state["encoder.0.bias"][0] = math.nan
    save_file(state, str(weights))
    code, err = run_cli(["evaluate", str(finished), "--json"], capsys)
    assert code == 2 and "encoder.0.bias holds inf/NaN" in err and err.count("\n") == 1, err
    # a bound that overflows on finite weights: printed as null (valid JSON), named, exit code 3
    weights.write_bytes(good)
    real = evaluate_cli.summarize

    def overflowing(*a, **k):
        return {**real(*a, **k), "elbo": -math.inf, "iwae_2": math.nan}

    monkeypatch.setattr(evaluate_cli, "summarize", overflowing)
    code = cli.main(["evaluate", str(finished), "--json", "--k", "10"])
    out, err = capsys.readouterr()
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} printed"))
    assert doc["elbo"] is None and doc["iwae_2"] is None and doc["log_likelihood"]["mean"] < 0
    assert code == cli.EXIT_NUMERICAL and "elbo, iwae_2 are not finite (printed as null)" in err


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("epoch", None, "checkpoint field 'epoch' missing"),
    ("epoch", "3", "checkpoint field 'epoch' is str '3', expected int"),
    ("step", -1, "checkpoint field 'step' is -1, expected >= 0"),
    ("finished", 1, "checkpoint field 'finished' is int '1', expected bool"),
    ("rng", None, "checkpoint field 'rng' missing"),
    ("rng", {"torch": "x"}, "checkpoint field 'rng' is damaged"),
    ("optimizer", [], "checkpoint field 'optimizer' is list '[]', expected dict"),
    ("model", {"encoder.0.weight": 1.0}, "weights are not a mapping of names to tensors"),
    ("position", {"order": torch.arange(5), "next_batch": 0}, "its epoch permutation covers 5 images"),
    ("position", {"order": torch.zeros(10_000, dtype=torch.int64), "next_batch": 0},
     "'position.order' is not a permutation"),
    ("position", {"order": None, "next_batch": 99}, "'position.next_batch' is 99, past the epoch's end"),
])
def test_crafted_checkpoint_fields_are_named(unfinished, capsys, field, value, expected):
    """A checkpoint with a valid checksum (as a crafted one would carry) but missing or mistyped
    fields: refused in one line naming the field, the folder untouched."""
    path = unfinished / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    if value is None:
        del state[field]
    else:
        state[field] = value
    save_signed(state, path)
    before = snapshot(unfinished)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert snapshot(unfinished) == before


# --- metrics rows are never lost --------------------------------------------------------------

def test_an_unreadable_metrics_line_is_kept_aside_not_dropped_with_the_rows_after_it(unfinished, capsys, caplog):
    metrics = unfinished / "metrics.jsonl"
    row1 = metrics.read_text()
    assert [json.loads(x)["epoch"] for x in row1.splitlines()] == [1]
    metrics.write_text('{"epoch": 0, "garbled\n' + row1 + '{"epoch": 2, "train_b')  # bad line, row, torn last line
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == json.loads(row1)
    assert (unfinished / "metrics.jsonl.bad-lines").read_text() == '1\t{"epoch": 0, "garbled\n'
    assert "1 line(s) are not metrics rows (line 1); moved to" in caplog.text


def test_binary_metrics_are_kept_aside_and_a_metrics_folder_is_one_line(unfinished, finished, capsys):
    (unfinished / "metrics.jsonl").write_bytes(b"\x00\xff\xfe binary\n\x89PNG\r\n")
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 0, err
    assert len((unfinished / "metrics.jsonl.bad-lines").read_text().splitlines()) == 2
    (finished / "metrics.jsonl").unlink()
    (finished / "metrics.jsonl").mkdir()
    code, err = run_cli(["evaluate", str(finished)], capsys)
    assert code == 2 and "metrics.jsonl: is a folder" in err and err.count("\n") == 1, err


# --- files that are not what they should be: one line, exit 2 -----------------------------------

def test_binary_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(os.urandom(64) + b"\x00\xff")
    code, err = run_cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "c.yaml: not a text file" in err and err.count("\n") == 1, err


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 3\nmodel:\n  latent_dim: 2\ntrain:\n  lr: 0.01\n")
    code, err = run_cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "key 'train' appears twice (lines 1 and 5)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["run.json", "report.json"])
def test_run_files_holding_a_json_list_are_one_line(finished, unfinished, capsys, name):
    for run in (finished, unfinished):
        (run / name).write_text("[]")
    code, err = run_cli(["evaluate", str(finished)], capsys)
    assert code == 2 and f"{name}: holds a JSON list" in err and err.count("\n") == 1, err
    if name == "run.json":
        code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
        assert code == 2 and "run.json: holds a JSON list" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("argv", "expected"), [
    (["evaluate", "{run}", "--k", "-5"], "--k: must be >= 1, got -5"),
    (["evaluate", "{run}", "--k", "0"], "--k: must be >= 1, got 0"),
    (["snr", "{run}", "--draws", "0"], "--draws: must be >= 2"),
    (["snr", "{run}", "--draws", "1"], "--draws: must be >= 2"),
    (["snr", "{run}", "--batch", "0"], "--batch: must be >= 1, got 0"),
    (["diagnose", "{run}", "--points", "-3"], "--points: must be >= 1, got -3"),
    (["diagnose", "{run}", "--points", "0"], "--points: must be >= 1, got 0"),
])
def test_counts_below_one_are_refused_not_reinterpreted(finished, capsys, argv, expected):
    code, err = run_cli([a.replace("{run}", str(finished)) for a in argv], capsys)
    assert code == 2 and expected in err and err.count("\n") == 1, err


def test_diagnose_into_a_read_only_folder_or_a_file_is_one_line(finished, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("mine")
    code, err = run_cli(["diagnose", str(finished), "--out", str(tmp_path / "a-file"), "--k", "5"], capsys)
    assert code == 2 and "a-file: the report folder (--out) is a file" in err and err.count("\n") == 1, err
    assert (tmp_path / "a-file").read_text() == "mine"
    # tests run as root, where chmod does not stop writes: refuse file creation instead
    monkeypatch.setattr(files.tempfile, "mkstemp", _raise(errno.EROFS))
    code, err = run_cli(["diagnose", str(finished), "--k", "5"], capsys)
    assert code == 2 and f"cannot write in {finished}: Read-only file system" in err and err.count("\n") == 1, err
    assert "choose another report folder (--out)" in err


def test_a_figure_that_cannot_be_written_is_one_line(finished, tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _raise(errno.ENOSPC))
    code, err = run_cli(["diagnose", str(finished), "--k", "5", "--points", "20", "--out", str(tmp_path / "d")],
                        capsys)
    assert code == 2 and "cannot write" in err and "diag-bound-vs-k.png" in err and err.count("\n") == 1, err


# --- resuming: what may change, what may not -------------------------------------------------------

def test_config_yaml_edited_between_kill_and_resume_is_refused(unfinished, capsys):
    path = unfinished / "config.yaml"
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 0.01"))
    before = snapshot(unfinished)
    code, err = run_cli(["train", "--no-eval", "--resume", str(unfinished)], capsys)
    assert code == 2 and "config.yaml: edited after the run started (train.lr: 0.001 -> 0.01" in err, err
    assert err.count("\n") == 1 and snapshot(unfinished) == before


def test_resume_accepts_overrides_that_leave_the_result_unchanged(unfinished, capsys):
    code, err = run_cli(["train", "--resume", str(unfinished), "--set", "train.lr=0.002",
                         "--set", "model.latent_dim=3"], capsys)
    assert code == 2 and "would change what the run trains (model.latent_dim: 2 -> 3; train.lr: 0.001 -> 0.002)" in err
    code, err = run_cli(["train", "--resume", str(unfinished), "--set", "eval.seed=5"], capsys)
    assert code == 2 and "eval.seed: 1 -> 5" in err
    code, err = run_cli(["train", "--resume", str(unfinished), "--set", "train.progress=false", "--set",
                         "eval.k_importance=7", "--set", "train.compile=false", "--data-dir", str(unfinished)], capsys)
    assert code == 0, err
    report = json.loads((unfinished / "report.json").read_text())
    assert report["log_likelihood"]["k"] == 7  # the evaluation setting given on resume was used
    assert json.loads((unfinished / "run.json").read_text())["config"]["eval"]["k_importance"] == 7


def test_ctrl_c_in_the_final_evaluation_then_resume_writes_the_report(tmp_path, monkeypatch, capsys):
    import elbolab.cli.train as train_cli

    out = tmp_path / "run"
    real, calls = train_cli.summarize, {"n": 0}

    def interrupted_once(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_cli, "summarize", interrupted_once)
    argv = [a for a in train_args(out, "eval.k_importance=10") if a != "--no-eval"]
    code, err = run_cli(argv, capsys)
    assert code == 130 and "interrupted" in err
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and not (out / "report.json").exists()
    weights = (out / "model.safetensors").read_bytes()
    code, err = run_cli(["train", "--resume", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["n_test"] == 2000
    assert (out / "model.safetensors").read_bytes() == weights  # evaluated, not trained again
    code, err = run_cli(["train", "--resume", str(out)], capsys)
    assert code == 2 and "already holds a finished and evaluated run" in err


def _npy_claiming_rows(path: Path, rows: int) -> Path:
    """A .npy whose header declares ``rows`` x 4 uint8 while 8 bytes follow it."""
    import numpy as np

    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (rows, 4)})
        f.write(bytes(8))
    return path


def _bad_data_files(d: Path) -> dict[str, Path]:
    import numpy as np

    files = {}
    np.savez(d / "objects.npz", test=np.array([[1, "a"], [2, None]], dtype=object))
    files["object-array .npz"] = d / "objects.npz"
    for name, array in {"uint16": np.full((5, 784), 1000, dtype=np.uint16),
                        "complex": np.ones((5, 784), dtype=np.complex64),
                        "string": np.array([["a", "b"], ["c", "d"]]),
                        "N x 0": np.zeros((5, 0), dtype=np.uint8),
                        "structured": np.zeros(5, dtype=[("a", "u1"), ("b", "u1")])}.items():
        np.save(d / f"{name.replace(' ', '')}.npy", array)
        files[f"{name} .npy"] = d / f"{name.replace(' ', '')}.npy"
    files["header claims 10^11 rows"] = _npy_claiming_rows(d / "huge.npy", 10**11)
    (d / "garbage.npz").write_bytes(b"PK\x03\x04" + bytes(range(200)))
    files["garbage .npz"] = d / "garbage.npz"
    (d / "garbage.npy").write_bytes(b"\x93NUMPY" + bytes(range(100)))
    files["garbage .npy"] = d / "garbage.npy"
    os.symlink(d / "loop2.npy", d / "loop.npy")
    os.symlink(d / "loop.npy", d / "loop2.npy")
    files["symlink loop"] = d / "loop.npy"
    return files


def test_every_bad_data_file_is_one_line_and_exit_2(finished, tmp_path, capsys):
    """evaluate --data-file with an object-array .npz, uint16 / complex / string / [N, 0] .npy,
    a header claiming 10^11 rows, a garbage .npz, a symlink loop: each a traceback before."""
    for what, path in _bad_data_files(tmp_path).items():
        code, err = run_cli(["evaluate", str(finished), "--data-file", str(path)], capsys)
        assert code == 2 and err.count("\n") == 1 and str(path) in err, (what, err)


def test_bad_arrays_from_python_are_one_line_too(tmp_path):
    import numpy as np

    from elbolab.data import DataError, as_dataset

    for bad in (np.ones((5, 4), dtype=np.complex64), np.array([["a", "b"]]), np.zeros((5, 0)),
                np.full((5, 4), 1000, dtype=np.uint16), torch.ones(5, 4, dtype=torch.complex64), torch.zeros(3, 0)):
        with pytest.raises(DataError):
            as_dataset(bad)
    small = as_dataset(np.full((5, 4), 7, dtype=np.uint16))  # 0..255 in a wider type is fine
    assert small.split("train").dtype == torch.uint8 and int(small.split("train").max()) == 7
