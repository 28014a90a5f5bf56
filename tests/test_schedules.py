from __future__ import annotations

import pytest

from elbolab.config import TrainConfig
from elbolab.schedules import iwae_epochs, iwae_pass, kl_weight, learning_rate


def test_iwae_schedule_passes_last_3_to_the_i_epochs() -> None:
    assert iwae_epochs(8) == 3280
    assert [iwae_pass(e) for e in (0, 1, 3, 4, 12, 13, 3279, 5000)] == [0, 1, 1, 2, 2, 3, 7, 7]
    cfg = TrainConfig(schedule="iwae", lr=1e-3)
    assert learning_rate(cfg, 0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 13) == pytest.approx(1e-3 * 10 ** (-3 / 7))
    assert learning_rate(cfg, 3279) == pytest.approx(1e-4)
    assert learning_rate(TrainConfig(lr=5e-4), 100) == 5e-4


def test_kl_warmup_is_linear_then_one() -> None:
    assert kl_weight(0.0, 100) == 0.0
    assert kl_weight(25.0, 100) == pytest.approx(0.25)
    assert kl_weight(150.0, 100) == 1.0
    assert kl_weight(0.0, 0) == 1.0
