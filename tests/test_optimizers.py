"""train.optimizer: AdamNormGrad against its update computed by hand, its state through a
checkpoint, and the name checked like every other registry name."""

from __future__ import annotations

import math

import pytest
import torch
from trainhelp import fit

import elbolab.training.loop as train_loop
from elbolab.config import ConfigError, RunConfig, preset
from elbolab.data.dataset import ImageDataset
from elbolab.optimizers import NORM_EPS, AdamNormGrad
from elbolab.runs import load_checkpoint
from elbolab.training import RunState


def hand_adamnormgrad(p0: list[float], grads: list[list[float]], lr: float, b1: float, b2: float,
                      eps: float) -> list[float]:
    """The VampPrior code's update, written out in Python floats (float64) for one tensor."""
    p, m, v = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    for t, g in enumerate(grads, start=1):
        norm = math.sqrt(sum(x * x for x in g)) + NORM_EPS
        gn = [x / norm for x in g]
        m = [b1 * a + (1 - b1) * x for a, x in zip(m, gn, strict=True)]
        v = [b2 * a + (1 - b2) * x * x for a, x in zip(v, gn, strict=True)]
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = [a - step * mm / (math.sqrt(vv) + eps) for a, mm, vv in zip(p, m, v, strict=True)]
    return p


def test_adamnormgrad_matches_the_hand_computed_update():
    """Three steps on two tiny float64 tensors, one skipping a step (no gradient): each
    parameter's own norm, its own step count, exact to float64 rounding."""
    a0, b0 = [1.0, -2.0, 0.5, 3.0], [0.25, -0.75]
    a = torch.nn.Parameter(torch.tensor(a0, dtype=torch.float64).reshape(2, 2))
    b = torch.nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    lr, betas, eps = 0.1, (0.8, 0.9), 1e-3
    opt = AdamNormGrad([a, b], lr=lr, betas=betas, eps=eps)
    ga = [[3.0, 4.0, 0.0, 0.0], [-1.0, 0.5, 2.0, 1e-3], [1e-6, 0.0, -2e-6, 0.0]]
    gb = [[1e-9, 0.0], None, [5.0, -5.0]]
    for g1, g2 in zip(ga, gb, strict=True):
        a.grad = torch.tensor(g1, dtype=torch.float64).reshape(2, 2)
        b.grad = None if g2 is None else torch.tensor(g2, dtype=torch.float64)
        opt.step()
    want_a = hand_adamnormgrad(a0, ga, lr, *betas, eps)
    want_b = hand_adamnormgrad(b0, [g for g in gb if g is not None], lr, *betas, eps)
    assert a.detach().flatten().tolist() == pytest.approx(want_a, rel=1e-14, abs=1e-15)
    assert b.detach().tolist() == pytest.approx(want_b, rel=1e-14, abs=1e-15)
    assert (opt.state[a]["step"], opt.state[b]["step"]) == (3, 2)


def grey_dataset() -> ImageDataset:
    g = torch.Generator().manual_seed(3)
    splits = {"train": torch.randint(0, 256, (200, 16), generator=g, dtype=torch.uint8),
              "valid": torch.randint(0, 256, (40, 16), generator=g, dtype=torch.uint8)}
    return ImageDataset("grey-test", splits, (4, 4), binary=False)


def small_config(**over) -> RunConfig:
    base = {"data.binarization": "dynamic", "model.hidden": [8], "model.latent_dim": 3, "objective.k": 1,
            "train.optimizer": "adamnormgrad", "train.epochs": 3, "train.batch_size": 20, "train.progress": False,
            "train.checkpoint_minutes": 0, "train.checkpoint_steps": 4, "train.threads": 1}
    return RunConfig().with_overrides({**base, **over})


class Crash(Exception):
    """A killed process: the resumed Trainer starts from the checkpoint alone."""


@pytest.mark.usefixtures("restore_threads")
def test_adamnormgrad_state_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    cfg = small_config()
    ref = RunState(cfg, tmp_path / "ref", grey_dataset())
    assert isinstance(ref.optimizer, AdamNormGrad)
    fit(ref)
    steps = {"n": 0}

    def crash_at_step_17(name: str) -> None:
        steps["n"] += name == "step"
        if steps["n"] == 17:
            raise Crash

    monkeypatch.setattr(train_loop, "fault_point", crash_at_step_17)
    with pytest.raises(Crash):
        fit(RunState(cfg, tmp_path / "run", grey_dataset()))
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["state"]
    assert saved and all(s["step"] == 16 for s in saved.values())
    monkeypatch.setattr(train_loop, "fault_point", lambda name: None)
    resumed = RunState(cfg, tmp_path / "run", grey_dataset())
    fit(resumed)
    for (name, x), y in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for p, q in zip(ref.model.parameters(), resumed.model.parameters(), strict=True):
        sp, sq = ref.optimizer.state[p], resumed.optimizer.state[q]
        assert sp["step"] == sq["step"] == 30
        assert torch.equal(sp["exp_avg"], sq["exp_avg"]) and torch.equal(sp["exp_avg_sq"], sq["exp_avg_sq"])


def test_optimizer_name_is_checked_and_the_vampprior_preset_uses_adamnormgrad():
    with pytest.raises(ConfigError, match=r"train\.optimizer: unknown optimizer 'adamnormgard'.*'adamnormgrad'"):
        RunConfig().with_overrides({"train.optimizer": "adamnormgard"})
    assert RunConfig().train.optimizer == "adam"
    t = preset("vampprior-paper").train
    assert (t.optimizer, t.lr, t.adam_betas, t.adam_eps) == ("adamnormgrad", 5e-4, (0.9, 0.999), 1e-8)
    assert preset("iwae-paper").train.optimizer == "adam"
