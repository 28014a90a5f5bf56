"""One set of limits (elbolab.limits) for every entry point: the config, the CLI's options and the
Python API refuse the same values with the same one-line message, before any computation.

The computation is replaced by a function that fails the test if it is reached: a value that
slips through would otherwise start a run of 10^12 samples or 10^4 threads.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import elbolab
import elbolab.cli.evaluate as cli_evaluate
import elbolab.cli.gaps as cli_gaps
from elbolab import limits
from elbolab.cli import main
from elbolab.config import ConfigError, RunConfig
from elbolab.diagnostics.ais import AISSettings
from elbolab.diagnostics.gaps import GapSettings, gap_split
from elbolab.diagnostics.local_opt import LocalOptSettings

pytestmark = pytest.mark.usefixtures("restore_threads")


class Reached(Exception):
    """The computation started: the value was not refused up front."""


def reached(*args, **kwargs):
    raise Reached


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    rc = main(["train", "--out", str(run), "--no-eval", "--set", "train.epochs=1", "--set", "model.latent_dim=2",
               "--set", "model.hidden=[8]", "--set", "train.progress=false", "--set", "train.eval_every=0",
               "--set", "train.threads=1"])
    assert rc == 0
    return run


def test_the_config_reads_its_caps_from_limits():
    with pytest.raises(ConfigError, match="objective.k: must be between 1 and 1,000,000"):
        RunConfig().with_overrides({"objective.k": limits.MAX_SAMPLES + 1})
    with pytest.raises(ConfigError, match="eval.k_importance: must be between 1 and 10,000,000"):
        RunConfig().with_overrides({"eval.k_importance": limits.MAX_EVAL_SAMPLES + 1})
    with pytest.raises(ConfigError, match="train.threads: must be between 0 and 4,096"):
        RunConfig().with_overrides({"train.threads": limits.MAX_THREADS + 1})


@pytest.mark.parametrize(("argv", "expected"), [
    (["evaluate", "{run}", "--k", "1000000000000"], "--k: must be between 1 and 10,000,000, got 1,000,000,000,000"),
    (["diagnose", "{run}", "--k", "100000000"], "--k: must be between 1 and 10,000,000"),
    (["snr", "{run}", "--k", "1", "10000000"], "--k: must be between 1 and 1,000,000"),
    (["snr", "{run}", "--draws", "1000000000000"], "--draws: must be between 2 and"),
    (["gaps", "{run}", "--threads", "9999"], "--threads: must be between 0 and 4,096, got 9,999"),
    (["gaps", "{run}", "--threads", "-1"], "--threads: must be >= 0, got -1"),
    (["gaps", "{run}", "--is-k", "1000000000000"], "--is-k: must be between 1 and 10,000,000"),
    (["gaps", "{run}", "--samples", "10000000"], "--samples: must be between 1 and 1,000,000"),
    (["gaps", "{run}", "--lr", "inf"], "--lr: must be a finite number > 0, got inf"),
    (["gaps", "{run}", "--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["gaps", "{run}", "--lr", "-1"], "--lr: must be a finite number > 0"),
    (["gaps", "{run}", "--seed", "-1"], "--seed: must be >= 0"),
    (["bench", "--threads", "9999"], "--threads: must be between 0 and 4,096, got 9,999"),
    (["gaps", "{run}", "--threads", str((os.cpu_count() or 1) + 1)], "CPU cores; set at most"),
    (["bench", "--threads", str((os.cpu_count() or 1) + 1)], "CPU cores; set at most"),
    (["evaluate", "{run}", "--device", "meta"], "--device: 'meta' is a meta device"),
    (["gaps", "{run}", "--device", "meta"], "--device: 'meta' is a meta device"),
])
def test_cli_options_past_the_limits_are_one_line_before_any_work(tiny_run, tmp_path, monkeypatch, capsys, argv,
                                                                 expected):
    for module, name in ((cli_evaluate, "summarize"), (cli_evaluate, "diagnose"), (cli_evaluate, "snr_sweep"),
                         (cli_gaps, "gap_split"), (cli_gaps, "plot_gaps")):
        monkeypatch.setattr(module, name, reached)
    monkeypatch.setattr(torch, "set_num_threads", reached)
    monkeypatch.chdir(tmp_path)
    code = main([a.replace("{run}", str(tiny_run)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("call", "expected"), [
    (lambda run: elbolab.evaluate(run, k=0), "k: must be >= 1, got 0"),
    (lambda run: elbolab.evaluate(run, k=10**12), "k: must be between 1 and 10,000,000"),
    (lambda run: elbolab.evaluate(run, bound_k=-2), "bound_k: must be >= 1, got -2"),
    (lambda run: elbolab.evaluate(run, bound_k=0), "bound_k: must be >= 1, got 0"),
    (lambda run: elbolab.evaluate(run, k=2.5), "k: must be a whole number, got 2.5"),
    (lambda run: elbolab.diagnose(run, points=-3), "points: must be >= 1, got -3"),
    (lambda run: elbolab.diagnose(run, points=0), "points: must be >= 1, got 0"),
    (lambda run: elbolab.diagnose(run, k=0), "k: must be >= 1, got 0"),
    (lambda run: elbolab.snr(run, ks=[0, 5]), "ks: must be >= 1, got 0"),
    (lambda run: elbolab.snr(run, draws=1), "draws: must be >= 2, got 1"),
    (lambda run: elbolab.snr(run, batch=-1), "batch: must be >= 1, got -1"),
])
def test_python_api_counts_are_checked_as_the_cli_checks_them(tiny_run, monkeypatch, call, expected):
    """evaluate(k=0) used to run with K=1000, diagnose(points=-3) scored N-3 points and
    evaluate(bound_k=-2) died in a KeyError."""
    import elbolab.api as api

    for name in ("summarize", "write_diagnostics", "snr_sweep"):
        monkeypatch.setattr(api, name, reached)
    with pytest.raises(ConfigError) as e:
        call(elbolab.load_run(tiny_run))
    assert str(e.value) == expected or str(e.value).startswith(expected), str(e.value)


@pytest.mark.parametrize(("settings", "expected"), [
    (GapSettings(local=LocalOptSettings(lr=math.inf)), "q* lr: must be a finite number > 0, got inf"),
    (GapSettings(is_k=10**12), "is_k: must be between 1 and 10,000,000"),
    (GapSettings(ais=AISSettings(chains=0)), "AIS chains: must be >= 1, got 0"),
    (GapSettings(ais=AISSettings(initial_step_size=math.nan)), "AIS initial_step_size: must be a finite number"),
    (GapSettings(family="flow"), "q* family: unknown q* family 'flow'"),
])
def test_gap_split_checks_its_settings_before_any_work(monkeypatch, settings, expected):
    import elbolab.diagnostics.gaps as gaps

    monkeypatch.setattr(gaps, "amortized_elbo", reached)
    with pytest.raises(ConfigError, match=expected.replace("*", r"\*").replace("(", r"\(")):
        gap_split(torch.nn.Linear(1, 1), torch.zeros(2, 1), settings)


def test_gaps_json_stdout_is_exactly_the_json(tiny_run, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["gaps", str(tiny_run), "--out", str(out), "--json", "--no-ais", "--points", "3", "--is-k", "20",
                 "--elbo-samples", "20", "--max-steps", "20", "--no-progress", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # nothing but the JSON on stdout
    assert summary["tiny"]["points"] == 3
    assert f"report: {out / 'gaps.json'}" in captured.err
