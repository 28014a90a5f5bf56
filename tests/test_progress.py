"""Every long stage reports progress that moves, on a terminal and in a log file, and the
Python API shows it by default: off a terminal, plain lines every $ELBOLAB_PROGRESS_SECONDS
(0 here, so every update prints) rather than a tqdm bar's carriage returns."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import elbolab
from elbolab.config import ModelConfig
from elbolab.diagnostics.gradient_snr import snr_sweep
from elbolab.diagnostics.local_opt import LocalOptSettings, optimize_local
from elbolab.models import build_model
from elbolab.progress import LINE_SECONDS_ENV, Progress


@pytest.fixture(autouse=True)
def every_update_prints(monkeypatch):
    monkeypatch.setenv(LINE_SECONDS_ENV, "0")
    level = logging.getLogger("elbolab").level
    yield
    logging.getLogger("elbolab").setLevel(level)


def counts(text: str, desc: str) -> list[int]:
    """The running counts of ``desc``'s progress lines, in order."""
    return [int(n) for n in re.findall(rf"^{re.escape(desc)}: (\d+)", text, flags=re.M)]


def model(d: int = 784):
    torch.manual_seed(0)
    return build_model(ModelConfig(latent_dim=3, hidden=(8,)), d)


def test_off_a_terminal_a_stage_prints_lines_that_move_and_an_end(caplog):
    caplog.set_level(logging.INFO, "elbolab")
    with Progress(3, "stage", "img", stream=io.StringIO()) as bar:  # a StringIO is no terminal
        for _ in range(3):
            bar.update(1)
    text = "\n".join(caplog.messages)
    assert counts(text, "stage") == [1, 2, 3, 3], text
    assert "1/3 img (33%)" in text and "~0:00 left" in text and text.rstrip().endswith("done")


def test_lines_wait_for_the_interval_and_a_silenced_logger_shows_nothing(caplog):
    caplog.set_level(logging.INFO, "elbolab")
    with Progress(3, "slow", stream=io.StringIO(), seconds=3600) as bar:
        bar.update(3)
    assert "slow" not in "\n".join(caplog.messages)  # none due within the hour, so no closing line either
    elbolab.set_verbosity("warning")
    with Progress(3, "quiet", stream=io.StringIO()) as bar:
        bar.update(3)
    assert "quiet" not in "\n".join(caplog.messages)
    with pytest.raises(ValueError, match="level must be one of"):
        elbolab.set_verbosity("loud")


def test_gaps_q_star_reports_its_steps_while_no_point_has_finished(caplog):
    caplog.set_level(logging.INFO, "elbolab")
    x = torch.bernoulli(torch.full((2, 6), 0.4))
    s = LocalOptSettings(samples=2, check_every=2, max_steps=6, eval_samples=4, min_lr=1e-12)
    optimize_local(model(6), x, "encoder", s, progress=True)
    steps = re.findall(r"q\* \(encoder\): 0/2 points .*step=(\d+)/6", "\n".join(caplog.messages))
    assert steps == ["2", "4", "6"], "\n".join(caplog.messages)


def test_snr_counts_its_samples_as_it_draws_them(caplog):
    caplog.set_level(logging.INFO, "elbolab")
    snr_sweep(model(6), torch.bernoulli(torch.full((3, 6), 0.4)), [1, 2], ["standard"], n_draws=2)
    assert counts("\n".join(caplog.messages), "gradient SNR") == [0, 1, 2, 2, 4, 6, 6], "\n".join(caplog.messages)
    assert "[estimator=standard, k=2]" in "\n".join(caplog.messages)


def test_train_model_logs_each_epoch(caplog):
    caplog.set_level(logging.INFO, "elbolab")
    bounds = elbolab.train_model(model(6), torch.bernoulli(torch.full((20, 6), 0.4)), epochs=2, batch_size=10)
    assert re.findall(r"epoch (\d)/2: train bound (-\d+\.\d{2})", "\n".join(caplog.messages)) == [
        ("1", f"{bounds[0]:.2f}"), ("2", f"{bounds[1]:.2f}")]
    caplog.clear()
    elbolab.train_model(model(6), torch.bernoulli(torch.full((20, 6), 0.4)), epochs=2, batch_size=10, progress=False)
    assert not [m for m in caplog.messages if m.startswith("epoch ")], caplog.messages


SCRIPT = """
import sys, torch, elbolab
from elbolab.config import ModelConfig
from elbolab.models import build_model
if sys.argv[1] == "quiet":
    elbolab.set_verbosity("warning")
torch.manual_seed(0)
m = build_model(ModelConfig(latent_dim=3, hidden=(8,)), 6)
r = elbolab.evaluate(m, torch.bernoulli(torch.full((250, 6), 0.4)), k=20)
print(round(r["log_likelihood"]["mean"], 6))
"""


@pytest.mark.parametrize("mode", ["default", "quiet"])
def test_the_python_api_shows_progress_on_stderr_by_default(mode):
    env = {**os.environ, LINE_SECONDS_ENV: "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if mode == "quiet":
        assert done.stderr == ""
    else:  # batches of 100 images: the count moves 100, 200, 250, then the closing line
        assert counts(done.stderr, "test log p(x), IS K=20") == [100, 200, 250, 250], done.stderr
        assert counts(done.stderr, "active units") == [100, 200, 250, 250], done.stderr
