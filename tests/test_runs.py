"""Run folders written before the likelihood owned the decoder's output layer still load.

The folders in tests/data/legacy-runs were trained and evaluated by elbolab 0.1.0 with that
older layout (the output layer saved as ``decoder.N``, ``p_x.N`` or ``p_x_out``); reloaded
now, the same weights must give the very numbers their report.json recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import elbolab
from elbolab.data import evaluation_images, load
from elbolab.diagnostics.summary import summarize

LEGACY = Path(__file__).parent / "data" / "legacy-runs"
OLD_KEY = {"one-layer": "decoder.2.weight", "two-layer": "p_x.2.weight", "hierarchical": "p_x_out.weight"}


@pytest.mark.parametrize("name", sorted(OLD_KEY))
def test_legacy_run_folder_loads_and_gives_its_recorded_numbers(name: str, one_thread) -> None:
    folder = LEGACY / name
    assert OLD_KEY[name] in load_file(str(folder / "model.safetensors"))  # really the old layout
    run = elbolab.load_run(folder)
    assert "likelihood.head.weight" in run.model.state_dict()
    cfg = run.config
    data = load(cfg.data.name)
    x = evaluation_images(data, "test", cfg.data.binarization, cfg.data.binarization_seed)
    e = cfg.eval
    got = summarize(run.model, x, cfg.objective.k, e.k_importance, e.batch_size, e.chunk_size,
                    e.active_unit_threshold, e.seed)
    want = run.report
    assert got["elbo"] == pytest.approx(want["elbo"], rel=1e-6)
    assert got[f"iwae_{cfg.objective.k}"] == pytest.approx(want[f"iwae_{cfg.objective.k}"], rel=1e-6)
    assert got["log_likelihood"]["mean"] == pytest.approx(want["log_likelihood"]["mean"], rel=1e-6)
