"""The Python API as a user calls it: own data in, a run out, evaluated, diagnosed, reloaded.

The numbers each call returns are checked against the lower-level functions run on the
same images (summarize on the stored split), and against each other across a reload and
the CLI; what a run records about its data is checked against checksums computed here.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
import yaml
from trainhelp import fit

import elbolab
from elbolab import cli
from elbolab.api import config_for
from elbolab.config import ConfigError, RunConfig, preset
from elbolab.data import DataError, ImageDataset, as_dataset, data_source, evaluation_images, load
from elbolab.diagnostics.summary import summarize
from elbolab.training import RunState

TINY = {"model.hidden": [16], "model.latent_dim": 4, "train.epochs": 2, "train.batch_size": 60,
        "train.progress": False, "train.threads": 1}

pytestmark = pytest.mark.usefixtures("restore_threads")


def images(n: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 8, 8, generator=g) < 0.3).float()


def stored_sha256(x: torch.Tensor) -> str:
    """The checksum a run records for a split, computed independently from numpy bytes."""
    a = np.ascontiguousarray(x.reshape(x.shape[0], -1).numpy().astype(np.uint8))
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def in_memory_run(tmp_path_factory):
    x = images()
    out = tmp_path_factory.mktemp("api") / "run"
    before = torch.get_num_threads()
    run = elbolab.train(x[:240], test=x[240:], out=out, **TINY)
    torch.set_num_threads(before)
    return run, x


def test_a_run_on_in_memory_data_records_it(in_memory_run) -> None:
    run, x = in_memory_run
    assert yaml.safe_load((run.path / "config.yaml").read_text())["data"]["name"] == "user"
    info = json.loads((run.path / "run.json").read_text())
    assert info["dataset"] == "user" and info["data_dim"] == 64 and info["image_shape"] == [8, 8]
    src = info["data_source"]
    assert src["kind"] == "in-memory" and "not reloadable" in src["note"]
    assert src["splits"]["train"] == {"n": 240, "sha256": stored_sha256(x[:240])}
    assert src["splits"]["test"] == {"n": 60, "sha256": stored_sha256(x[240:])}


def test_evaluate_in_session_reloaded_and_with_data_agree(in_memory_run, caplog) -> None:
    run, x = in_memory_run
    first = elbolab.evaluate(run, k=50)
    truth = summarize(run.model, x[240:].reshape(60, -1), run.config.objective.k, 50, seed=run.config.eval.seed)
    for key in ("elbo", "iwae_5", "log_likelihood", "active_units"):
        assert first[key] == truth[key]
    reloaded = elbolab.load_run(run.path)
    with pytest.raises(DataError, match=r"pass it again") as err:
        elbolab.evaluate(reloaded)
    assert "\n" not in str(err.value) and "x_test" in str(err.value)
    again = elbolab.evaluate(reloaded, x[240:], k=50)
    assert again["log_likelihood"] == first["log_likelihood"] and again["data_matches_recorded"] is True
    with caplog.at_level(logging.WARNING, logger="elbolab"):
        other = elbolab.evaluate(reloaded, x[:60], k=50)
    assert other["data_matches_recorded"] is False and "differs from the test split" in caplog.text
    with pytest.raises(DataError, match=r"the data has 25 values per image \(5x5\); the run's model takes 64 \(8x8\)"):
        elbolab.evaluate(reloaded, images(10)[:, :5, :5])


def test_diagnose_and_snr_from_python(in_memory_run, tmp_path) -> None:
    run, x = in_memory_run
    report = elbolab.diagnose(elbolab.load_run(run.path), x[240:], out=tmp_path, k=20, quiet=True)
    ll = elbolab.evaluate(run, k=20)["log_likelihood"]
    assert report["log_likelihood"]["k"] == 20 and report["n"] == 60
    assert report["log_likelihood"]["mean"] == pytest.approx(ll["mean"], abs=4 * ll["stderr"])
    assert (tmp_path / "diagnostics.md").exists()
    rows = elbolab.snr(run, ks=[1, 4], estimators=["dreg"], draws=4, batch=5)
    assert [(r["estimator"], r["k"]) for r in rows] == [("dreg", 1), ("dreg", 4)]


def test_cli_on_an_in_memory_run_needs_the_data_file_then_agrees(in_memory_run, tmp_path, capsys) -> None:
    run, x = in_memory_run
    assert cli.main(["evaluate", str(run.path), "--k", "50", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-file FILE.npy" in err
    np.save(tmp_path / "test.npy", x[240:].numpy())
    assert cli.main(["evaluate", str(run.path), "--k", "50", "--json", "--data-file", str(tmp_path / "test.npy")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["log_likelihood"] == elbolab.evaluate(run, k=50)["log_likelihood"]
    out = tmp_path / "diag"
    assert cli.main(["diagnose", str(run.path), "--k", "10", "--out", str(out),
                     "--data-file", str(tmp_path / "test.npy")]) == 0
    assert json.loads((out / "diagnostics.json").read_text())["n"] == 60
    capsys.readouterr()
    assert cli.main(["snr", str(run.path), "--k", "1", "3", "--estimators", "dreg", "--draws", "3", "--batch", "5",
                     "--data-file", str(tmp_path / "test.npy"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["estimator"], r["k"]) for r in rows] == [("dreg", 1), ("dreg", 3)]


def test_a_run_on_files_records_their_sha256_and_refuses_a_changed_file(tmp_path, capsys) -> None:
    g = torch.Generator().manual_seed(2)
    grey = torch.randint(0, 256, (200, 6, 6), generator=g, dtype=torch.uint8).numpy()
    path = tmp_path / "mine.npz"
    np.savez(path, train=grey[:150], test=grey[150:])
    run = elbolab.train(path, out=tmp_path / "run", **{**TINY, "data.binarization": "dynamic"})
    src = json.loads((run.path / "run.json").read_text())["data_source"]
    assert src["kind"] == "files"
    assert src["splits"]["test"] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    reloaded = elbolab.load_run(run.path)
    from_files = elbolab.evaluate(reloaded, k=30)  # no data passed: read back from the file
    x_test = evaluation_images(as_dataset({"test": grey[150:]}, require_train=False), "test", "dynamic", 0)
    assert from_files["log_likelihood"] == summarize(reloaded.model, x_test, 5, 30)["log_likelihood"]
    assert cli.main(["evaluate", str(run.path), "--k", "30", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["log_likelihood"] == from_files["log_likelihood"]
    np.savez(path, train=grey[:150], test=255 - grey[150:])
    assert cli.main(["evaluate", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: changed since" in err and err.count("\n") == 1


def test_a_dataset_the_config_does_not_name_is_recorded_as_passed_in(tmp_path, capsys, caplog) -> None:
    """RunState(cfg naming the embedded data, dataset=other): evaluate must not score the embedded data."""
    x = images(120).reshape(120, -1).to(torch.uint8)
    cfg = RunConfig().with_overrides({**TINY, "train.epochs": 1})
    with caplog.at_level(logging.WARNING, logger="elbolab"):
        fit(RunState(cfg, tmp_path / "run", ImageDataset("my-data", {"train": x[:100], "test": x[100:]}, (8, 8),
                                                    True)))
    assert "'my-data'" in caplog.text
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data_source"]["kind"] == "in-memory" and info["data_source"]["name"] == "my-data"
    assert cli.main(["evaluate", str(tmp_path / "run")]) == 2
    assert "trained on data passed in from Python ('my-data'" in capsys.readouterr().err


def test_data_conversion_keeps_values_and_refuses_what_it_cannot_store(caplog) -> None:
    grey = torch.arange(256, dtype=torch.float32).reshape(4, 64) / 255.0
    ds = as_dataset(grey)
    assert not ds.binary and torch.equal(ds.split("train"), torch.arange(256, dtype=torch.uint8).reshape(4, 64))
    assert ds.image_shape == (64,)
    with caplog.at_level(logging.WARNING, logger="elbolab"):
        off = as_dataset(torch.full((2, 3), 0.3))  # 76.5 / 255: rounds to 77 (no 0.3 in 8 bits)
    assert int(off.split("train")[0, 0]) == 77 and "largest change" in caplog.text
    assert as_dataset(np.ones((3, 1, 2, 2), dtype=bool)).binary
    assert as_dataset(np.ones((3, 1, 2, 2), dtype=bool)).image_shape == (2, 2)
    pairs = torch.utils.data.TensorDataset(torch.rand(5, 4), torch.arange(5))
    assert torch.equal(as_dataset(pairs).labels["train"], torch.arange(5))
    with pytest.raises(DataError, match=r"float pixels must lie in \[0, 1\].*found -1\.5\.\.2"):
        as_dataset(torch.tensor([[-1.5, 2.0]]))
    with pytest.raises(DataError, match=r"integer pixels must be 0\.\.255"):
        as_dataset(np.array([[0, 300]]))
    with pytest.raises(DataError, match=r"a mapping needs 'train'"):
        as_dataset({"tset": grey})


def test_registered_data_records_its_name_and_files() -> None:
    src = data_source(load("binarized-mnist-embedded"))
    assert src["kind"] == "registered" and src["name"] == "binarized-mnist-embedded"
    assert "MANIFEST.json" in src["files"]


def test_config_for_reads_objects_presets_files_and_mappings(tmp_path) -> None:
    assert config_for("iwae-paper") == preset("iwae-paper")
    assert config_for(None, {"objective.k": 10}).objective.k == 10
    assert config_for({"objective": {"k": 7}}).objective.k == 7
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.0003\n")
    assert config_for(tmp_path / "c.yaml").train.lr == 3e-4
    with pytest.raises(ConfigError, match=r"objective.kk: unknown key \(did you mean 'k'\?\)"):
        config_for(RunConfig(), {"objective.kk": 3})
