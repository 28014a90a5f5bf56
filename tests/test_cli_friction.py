"""What a newcomer met at the command line: epoch lines, -v anywhere, config show, presets'
datasets, an unused --data-dir, the printed report, progress bars, the figures' layout."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import matplotlib
import pytest
import torch
import yaml

from elbolab.cli import build_parser, main
from elbolab.config import RunConfig, commented_yaml, field_comments, preset

TINY = ["--set", "model.hidden=[16]", "--set", "model.latent_dim=3", "--set", "train.progress=false",
        "--set", "train.threads=1"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "elbolab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow  # two `elbolab train` processes
def test_one_line_per_epoch_by_default_and_detail_with_v_after_the_subcommand(tmp_path):
    plain = run_cli("train", "--out", str(tmp_path / "a"), "--no-eval", "--set", "train.epochs=2", *TINY)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()  # with what the command prints; stderr keeps warnings and errors
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("train bound -" in e and "valid L_5 -" in e and e.split(", ")[2].endswith(" s") for e in epochs)
    assert "active units" in epochs[1] and "I(x;z)" in epochs[1]  # the monitor at the last epoch
    verbose = run_cli("train", "-v", "--out", str(tmp_path / "b"), "--no-eval", "--set", "train.epochs=1", *TINY)
    assert verbose.returncode == 0, verbose.stderr
    # -v: timestamps, and the whole metrics row as JSON (debug)
    assert any(line[2] == ":" and '"train_bound"' in line for line in verbose.stdout.splitlines())


def test_v_is_accepted_before_and_after_any_subcommand():
    parser = build_parser()
    assert parser.parse_args(["-v", "train"]).verbose is True
    assert parser.parse_args(["train", "-v"]).verbose is True
    assert parser.parse_args(["train"]).verbose is False
    assert parser.parse_args(["data", "list", "-v"]).verbose is True
    assert parser.parse_args(["config", "show", "--verbose"]).verbose is True


def test_header_names_the_estimator_and_counts_epochs(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--no-eval", "--set", "train.epochs=1",
                 "--set", "objective.estimator=dreg", *TINY]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "(iwae, k=5, dreg gradient estimator)" in header and "for 1 epoch ->" in header


def test_report_has_no_second_l1_line_at_k1():
    from elbolab.diagnostics.summary import format_summary

    base = {"n_test": 10, "elbo": -100.0, "log_likelihood": {"k": 1000, "mean": -95.0, "stderr": 0.5},
            "active_units": {"label": "3", "threshold": 0.01}}
    one = format_summary({**base, "iwae_k": 1, "iwae_1": -100.0}).splitlines()
    five = format_summary({**base, "iwae_k": 5, "iwae_5": -98.0}).splitlines()
    assert [line[:25].strip() for line in one] == ["test points", "test ELBO (L_1)", "test log p(x), IS K=1000",
                                                   "active units"]
    assert [line[:25].strip() for line in five][2] == "test L_5" and len(five) == 5
    assert {line[25] != " " and line[24] == " " for line in five} == {True}  # values in one column


def test_config_show_prints_every_key_with_its_comment(capsys):
    assert main(["config", "show", "--preset", "vampprior-paper", "--set", "train.lr=3e-4"]) == 0
    text = capsys.readouterr().out
    cfg = preset("vampprior-paper").with_overrides({"train.lr": 3e-4})
    assert yaml.safe_load(text) == cfg.to_dict()  # the printed YAML is the config
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if not line.lstrip().startswith("#")]
    assert all(lines[i - 1].lstrip().startswith("# ") for i in keys)  # a comment above every key
    # the comments are the dataclasses' own #: comments, read from their source
    from elbolab.config import TrainConfig

    assert "# " + field_comments(TrainConfig)["monitor_points"][:60] in text
    assert main(["config", "show", "--set", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_every_config_key_has_a_comment():
    from elbolab.config import MODEL_SECTIONS, config_items

    assert {"two_layer", "hierarchical", "conv_hierarchical", "pixel_hierarchical"} <= set(MODEL_SECTIONS)

    def walk(obj, where):
        comments = field_comments(type(obj))
        for name, value in config_items(obj):
            comment = comments.get(name) or MODEL_SECTIONS.get(name, (None, ""))[1]
            assert comment, f"{where}{name} has no #: comment in config/schema.py or its model's file"
            if hasattr(value, "__dataclass_fields__"):
                walk(value, f"{where}{name}.")

    walk(RunConfig(), "")
    assert yaml.safe_load(commented_yaml(RunConfig())) == RunConfig().to_dict()


def test_paper_presets_name_the_papers_datasets_and_fail_clearly_without_them(tmp_path, capsys):
    vamp, iwae = preset("vampprior-paper").data, preset("iwae-paper").data
    assert (vamp.name, vamp.binarization) == ("binarized-mnist", "static")
    assert (iwae.name, iwae.binarization) == ("mnist", "dynamic")
    assert preset("iwae-paper-two-layer").data.name == "mnist"
    out = tmp_path / "run"
    assert main(["train", "--preset", "vampprior-paper", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "binarized-mnist" in err and "elbolab data download" in err
    assert not out.exists()


def test_an_unused_data_dir_is_said(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="elbolab"):
        assert main(["train", "--out", str(tmp_path / "r"), "--no-eval", "--data-dir", str(tmp_path),
                     "--set", "train.epochs=1", *TINY]) == 0
    said = [r.getMessage() for r in caplog.records if "--data-dir" in r.getMessage()]
    assert len(said) == 1 and "is not used" in said[0] and "binarized-mnist-embedded" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="elbolab"):
        assert main(["evaluate", str(tmp_path / "r"), "--k", "2", "--data-dir", str(tmp_path)]) == 0
    assert any("is not used" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="elbolab"):  # a dataset read from the folder: nothing said
        from elbolab.cli.common import data_dir_unused

        assert data_dir_unused(str(tmp_path), "mnist") is None and data_dir_unused(None, "binarized-mnist-embedded") \
            is None


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_stages_show_what_they_do_on_a_terminal(monkeypatch):
    from elbolab.config import ModelConfig
    from elbolab.diagnostics.summary import summarize
    from elbolab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=2, hidden=(8,)), 12)
    x = torch.bernoulli(torch.full((30, 12), 0.5))
    screen = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", screen)
    summarize(model, x, 5, k_importance=20, batch_size=10, progress=True)
    shown = screen.getvalue()
    assert "test log p(x), IS K=20:" in shown and "/30 [" in shown and "active units:" in shown
    quiet = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    summarize(model, x, 5, k_importance=20, batch_size=10)
    assert quiet.getvalue() == ""
    # diagnose's longest stage, bound vs K, names itself and counts the points
    from elbolab.diagnostics.bound_vs_k import bound_vs_k

    screen = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bound_vs_k(model, x, (1, 5, 20), batch_size=10, progress="bound vs k, k <= 20")
    assert "bound vs k, k <= 20:" in screen.getvalue() and "/30 [" in screen.getvalue()


def test_the_first_compiled_step_says_it_is_compiling(tmp_path, caplog, monkeypatch):
    import elbolab.preflight
    import elbolab.training.state
    from elbolab.training import RunState, train_runs

    monkeypatch.setattr(elbolab.training.state, "compile_objective", lambda objective, device: objective)
    monkeypatch.setattr(elbolab.preflight.shutil, "which", lambda name: "/usr/bin/c++")
    cfg = RunConfig().with_overrides({"model.hidden": [8], "model.latent_dim": 2, "train.epochs": 1,
                                      "train.compile": True, "train.progress": False, "train.batch_size": 3000})
    with caplog.at_level(logging.INFO, logger="elbolab"):
        train_runs([RunState(cfg, tmp_path / "r")])
    said = [r.getMessage() for r in caplog.records if "compil" in r.getMessage()]
    # batches of 3000, 3000, 3000 and 1000: one message per new batch size, each followed by its time
    assert [s.split(" (")[0] for s in said if s.startswith("compiling")] == [
        "compiling the training step for batches of 3000", "compiling the training step for batches of 1000"]
    assert sum(s.startswith("compiled in ") for s in said) == 2


def _bbox(artist, renderer):
    return artist.get_window_extent(renderer)


def test_two_latent_active_units_figure_has_whole_ticks_and_a_legend_clear_of_the_bars():
    from elbolab.diagnostics.active_units import ActiveUnits
    from elbolab.diagnostics.plots import active_units_figure

    au = ActiveUnits([torch.tensor([0.9, 0.6])], threshold=0.01)  # two tall bars: no free corner inside
    fig = active_units_figure(au)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [0.0, 1.0]
    legend = ax.get_legend() or fig.axes[-1].get_legend()
    for bar in ax.patches:
        assert not _bbox(legend, renderer).overlaps(_bbox(bar, renderer))
    matplotlib.pyplot.close(fig)


def test_snr_figure_labels_do_not_run_into_the_titles():
    from elbolab.diagnostics.gradient_snr import GradientSNR, snr_figure

    res = [GradientSNR("iwae", est, k, 10, {g: torch.ones(3) * k for g in ("encoder", "decoder")},
                       {g: torch.ones(3) for g in ("encoder", "decoder")})
           for est in ("standard", "dreg") for k in (1, 5, 25)]
    fig = snr_figure(res, title="runs/mine: batch 20")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [fig._suptitle] + [ax.title for ax in fig.axes]
    for ax in fig.axes:
        label = _bbox(ax.yaxis.label, renderer)
        for t in titles:
            assert not label.overlaps(_bbox(t, renderer)), (ax.get_ylabel(), t.get_text())
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("machine_output", [False, True])
def test_progress_lines_go_to_stdout_unless_it_carries_json(capsys, machine_output):
    from elbolab.cli import setup_logging

    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    root.handlers = []
    try:
        setup_logging(verbose=False, machine_output=machine_output)
        logging.getLogger("elbolab").info("epoch 1/2: a progress line")
        logging.getLogger("elbolab").warning("a warning")
        logging.getLogger("matplotlib").info("another library's chatter")
    finally:
        root.handlers, root.level = saved, saved_level
    out, err = capsys.readouterr()
    progress = err if machine_output else out
    assert "epoch 1/2: a progress line" in progress and "chatter" not in out + err
    assert err.splitlines()[-1] == "elbolab: warning: a warning"
    if machine_output:
        assert out == ""  # stdout holds the JSON alone
