"""``elbolab train`` with a non-standard estimator, then ``elbolab snr`` on the run."""

from __future__ import annotations

import json

import pytest

from elbolab.cli import main


def test_train_with_dreg_then_snr(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--out", str(run), "--no-eval", "--set", "model.hidden=[16]", "--set", "model.latent_dim=4",
               "--set", "train.epochs=1", "--set", "train.progress=false", "--set", "objective.name=miwae",
               "--set", "objective.m=2", "--set", "objective.k=2", "--set", "objective.estimator=dreg",
               "--set", "train.threads=1"])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_bound"] < 0
    capsys.readouterr()
    fig = tmp_path / "snr.png"
    rc = main(["snr", str(run), "--k", "1", "3", "--draws", "4", "--batch", "5", "--plot", str(fig), "--json"])
    assert rc == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["estimator"], r["k"]) for r in out] == [(e, k) for e in ("standard", "stl", "dreg") for k in (1, 3)]
    by = {(r["estimator"], r["k"]): r for r in out}
    # same seed, same draws: DReG is STL when every group holds one sample
    assert by[("dreg", 1)]["snr"] == by[("stl", 1)]["snr"]
    assert by[("dreg", 3)]["snr"]["decoder"] == by[("standard", 3)]["snr"]["decoder"]
    assert fig.stat().st_size > 0


def test_snr_bad_run_folder_is_one_line(tmp_path, capsys):
    assert main(["snr", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_snr_prints_a_table_of_the_json_numbers(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-eval", "--set", "model.hidden=[16]", "--set",
                 "model.latent_dim=4", "--set", "train.epochs=1", "--set", "train.progress=false"]) == 0
    args = ["snr", str(run), "--k", "1", "4", "--draws", "3", "--batch", "5"]
    capsys.readouterr()
    assert main(args + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "fixed batch of 5 images, 3 draws" in lines[0]
    assert lines[1].split() == ["estimator", "k", "encoder", "SNR", "encoder", "group", "SNR", "decoder", "SNR",
                                "decoder", "group", "SNR"]
    body = [line.split() for line in lines[3:]]
    assert len(body) == len(rows) == 6
    for cells, r in zip(body, rows, strict=True):  # the table is the JSON, rounded
        assert cells[:2] == [r["estimator"], str(r["k"])]
        want = [r["snr"]["encoder"], r["group_snr"]["encoder"], r["snr"]["decoder"], r["group_snr"]["decoder"]]
        assert [float(c) for c in cells[2:]] == pytest.approx(want, abs=5e-4)
