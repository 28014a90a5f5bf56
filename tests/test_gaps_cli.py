"""`elbolab gaps` end to end on a tiny run trained for one epoch, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from elbolab.cli import main

FAST = ["--points", "4", "--is-k", "100", "--elbo-samples", "100", "--max-steps", "100", "--ais-steps", "20",
        "--ais-chains", "4", "--leapfrog", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    rc = main(["train", "--out", str(run), "--no-eval", "--set", "train.epochs=1", "--set", "model.latent_dim=3",
               "--set", "model.hidden=[32]", "--set", "train.progress=false", "--set", "train.eval_every=0"])
    assert rc == 0
    return run


def test_gaps_writes_a_consistent_report(tiny_run, tmp_path):
    out = tmp_path / "gaps"
    assert main(["gaps", str(tiny_run), str(tiny_run), "--names", "a", "b", "--bdmc", "3", "--out", str(out),
                 *FAST]) == 0
    r = json.loads((out / "gaps.json").read_text())
    assert (out / "gaps.png").stat().st_size > 5000
    assert list(r["models"]) == ["a", "b"]
    m = r["models"]["a"]
    s, pp = m["summary"], m["per_point"]
    assert s["points"] == len(pp["elbo_optimal"]) == 4
    # the split adds up, per point and in the means
    assert s["inference_gap"]["mean"] == pytest.approx(
        s["approximation_gap"]["mean"] + s["amortization_gap"]["mean"], abs=1e-9)
    source = "ais" if s["log_px_source"] == "AIS" else "is_k100"
    log_px = pp[source]
    gaps = [lp - e for lp, e in zip(log_px, pp["elbo_amortized"], strict=True)]
    assert s["inference_gap"]["mean"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-9)
    assert m["settings"]["ais"]["steps"] == 20 and m["settings"]["local"]["max_steps"] == 100
    assert m["bdmc"]["n"] == 3 and m["bdmc"]["upper"]["reverse"] is True


def test_gaps_reports_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    assert main(["gaps", str(tmp_path / "missing")]) == 2
    assert main(["gaps", str(tiny_run), "--points", "0"]) == 2
    assert main(["gaps", str(tiny_run), str(tiny_run)]) == 2
    assert main(["gaps", str(tiny_run), "--names", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert "run.json: missing" in err and "--points" in err and "--out" in err and "--names" in err
