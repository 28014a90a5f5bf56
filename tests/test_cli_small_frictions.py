"""A newcomer's small frictions: --help shows defaults, -v says what it adds, a sweep's epoch
lines name their run, a resumed run's time counts every session, and the figures say when a
line hides another or a panel holds one point."""

from __future__ import annotations

import json
import logging

import torch

from elbolab.cli import build_parser, main
from elbolab.cli.train import _trained_in, trained_seconds
from elbolab.diagnostics import plots
from elbolab.diagnostics.gradient_snr import DECODER_NOTE, GradientSNR, snr_figure
from elbolab.diagnostics.report import monitor_sentence


def help_of(*command: str) -> str:
    parser = build_parser()
    for action in parser._actions:  # the subcommand's parser, as argparse prints it
        if hasattr(action, "choices") and isinstance(action.choices, dict) and command[0] in action.choices:
            sub = action.choices[command[0]]
            return " ".join(sub.format_help().split())
    raise AssertionError(command)


def test_help_shows_the_defaults_and_what_v_adds():
    gaps = help_of("gaps")
    assert "q* optimization steps at most (default: 10000)" in gaps
    assert "AIS chains per point (default: 16)" in gaps and "(default: None)" not in gaps
    assert "--no-ais skip AIS (log p(x) is then L_K) --ais-steps" in gaps  # a flag's False is no default
    for command in ("gaps", "snr", "evaluate"):
        assert "epoch" not in help_of(command).split("-v, --verbose")[1], command
    assert "every metric of every epoch" in help_of("train").split("-v, --verbose")[1]


def test_a_resumed_run_counts_the_time_of_all_its_sessions(tmp_path):
    rows = [{"epoch": 1, "seconds": 10.0, "monitor_seconds": 5.0}, {"epoch": 2, "seconds": 20.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trained_seconds(tmp_path, 3.0) == 35.0  # resumed: the earlier session's epochs count
    assert trained_seconds(tmp_path, 40.0) == 40.0  # one session: its wall clock, setup included
    assert _trained_in(35.0, 3.0) == "trained in 35 s over all its sessions (3 s in this one)"
    assert _trained_in(40.0, 40.0) == "trained in 40 s"


def test_sweep_epoch_lines_name_their_run_and_a_log_gets_no_bar(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, "elbolab")
    sets = {"model.hidden": "[20]", "model.latent_dim": 4, "objective.k": 2, "train.epochs": 1,
            "train.batch_size": 2000, "train.progress": "true", "train.threads": 1, "train.monitor_every": 0}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "--no-eval", "--out", str(tmp_path / "sw"), *args, "--sweep", "train.seed=0,1"]) == 0
    lines = [m for m in caplog.messages if "epoch 1/1:" in m]
    assert sorted(m.split(": epoch")[0] for m in lines) == ["seed=0", "seed=1"], lines
    assert "runs stacked" not in capsys.readouterr().err  # stderr is no terminal here: no tqdm bar


def test_the_monitor_figure_of_one_monitored_epoch_says_so(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    row = {"epoch": 1, "active_units": 3, "mutual_information": 1.5, "mutual_information_stderr": 0.1,
           "monitor_points": 100}
    plots.plot_monitor([row], tmp_path / "m.png")
    plots.plot_monitor([row, {**row, "epoch": 2}], tmp_path / "m2.png")
    one, two = (f._suptitle.get_text() for f in figs)
    assert "one monitored epoch (1): one point per panel" in one and "one monitored epoch" not in two
    assert all(line.get_marker() == "o" for line in figs[0].axes[0].lines)  # a single point is drawn
    assert list(figs[0].axes[0].get_xticks()) == [1]  # not fractions of an epoch around it
    m = {"epochs": [1], "points": 100, "last": {"epoch": 1, "active_units": 3}}
    assert "100 images, 1 epoch; at epoch 1: 3 active units." in monitor_sentence(m)
    assert ", 2 epochs;" in monitor_sentence({**m, "epochs": [1, 2]})


def test_the_snr_figure_notes_that_the_decoder_lines_coincide():
    g = torch.Generator().manual_seed(0)

    def result(est: str, k: int) -> GradientSNR:
        mean = {grp: torch.randn(5, generator=g, dtype=torch.float64) for grp in ("encoder", "decoder")}
        return GradientSNR("iwae", est, k, 10, mean, {grp: torch.ones(5, dtype=torch.float64) for grp in mean})

    fig = snr_figure([result(e, k) for e in ("standard", "dreg") for k in (1, 4)])
    notes = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes}
    assert notes == {"encoder parameters": [], "decoder parameters": [DECODER_NOTE]}
    alone = snr_figure([result("standard", k) for k in (1, 4)])
    assert all(not ax.texts for ax in alone.axes)
