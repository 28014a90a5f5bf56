"""`elbolab diagnose` end to end on a tiny 2-D-latent run trained for one epoch."""

from __future__ import annotations

import json
import math

import pytest

from elbolab.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    rc = main(["train", "--out", str(run), "--no-eval", "--set", "train.epochs=1", "--set", "model.latent_dim=2",
               "--set", "model.hidden=[32]", "--set", "train.progress=false", "--set", "train.eval_every=0"])
    assert rc == 0
    return run


@pytest.mark.slow  # every diagnostic and figure of a run (each has its own fast test)
def test_diagnose_writes_a_consistent_report(tiny_run, tmp_path):
    out = tmp_path / "report"
    assert main(["diagnose", str(tiny_run), "--k", "50", "--points", "120", "--out", str(out)]) == 0
    r = json.loads((out / "diagnostics.json").read_text())
    for name in ("bound_vs_k", "active_units", "surgery", "samples", "reconstructions", "latent_space", "q_ew"):
        assert (out / r["figures"][name]).stat().st_size > 5000, name
    assert r["bound_vs_k"]["k"] == [1, 2, 5, 10, 50]
    # the IS log-likelihood is the k = 50 column of the same samples
    assert r["log_likelihood"]["mean"] == pytest.approx(r["bound_vs_k"]["mean"][-1], abs=1e-12)
    assert r["log_likelihood"]["mean"] > r["bound_vs_k"]["mean"][0]
    s = r["surgery"]
    assert 0 <= s["mutual_information"] <= s["log_n"] == pytest.approx(math.log(120))
    assert s["identity_is_check"] and abs(s["identity_error"]) < 4 * s["identity_stderr"]
    for p in r["q_ew"]["points"]:
        elbos = [p["elbo_q_ew"][str(k)] for k in r["q_ew"]["ks"]]
        assert all(a < b for a, b in zip(elbos, elbos[1:], strict=False))
        assert elbos[-1] <= p["log_p"] + 1e-6
        assert p["converged"] and p["accuracy"] <= p["tol"]
        assert elbos[-1] <= p["log_p"] + p["accuracy"]
    md = (out / "diagnostics.md").read_text()
    assert "## ELBO surgery" in md and "diag-q-ew.png" in md and "nats" in md


def test_diagnose_reports_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "missing")]) == 2
    assert main(["diagnose", str(tiny_run), "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and "--k" in err


def test_eval_config_checks_the_diagnose_keys():
    from elbolab.config import ConfigError, RunConfig

    cfg = RunConfig().with_overrides({"eval.bound_ks": [1, 10, 100], "eval.surgery_samples": 4})
    assert cfg.eval.bound_ks == (1, 10, 100) and RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="eval.bound_ks"):
        RunConfig().with_overrides({"eval.bound_ks": [0, 5]})
    with pytest.raises(ConfigError, match="eval.surgery_samples"):
        RunConfig().with_overrides({"eval.surgery_samples": 0})


@pytest.mark.slow  # trains a VampPrior run, then every diagnostic (fast twin: tests/test_prior_training.py)
def test_vampprior_run_reports_its_pseudo_inputs(tmp_path):
    """A mixture prior adds the pseudo-input / component figure; its MC surgery identity is no check."""
    run = tmp_path / "vamp"
    assert main(["train", "--out", str(run), "--no-eval", "--set", "train.epochs=1", "--set", "model.latent_dim=2",
                 "--set", "model.hidden=[32]", "--set", "model.prior.name=vampprior", "--set",
                 "model.prior.components=8", "--set", "train.progress=false", "--set", "train.eval_every=0"]) == 0
    out = tmp_path / "report"
    assert main(["diagnose", str(run), "--k", "20", "--points", "60", "--out", str(out), "--data", "test"]) == 0
    r = json.loads((out / "diagnostics.json").read_text())
    assert (out / r["figures"]["prior_components"]).stat().st_size > 5000
    assert "diag-prior-components.png" in (out / "diagnostics.md").read_text()
    s = r["surgery"]
    assert 0 <= s["mutual_information"] <= s["log_n"] + 1e-9
    assert s["identity_is_check"] is False and s["identity_error"] is None
