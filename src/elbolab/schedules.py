"""Learning-rate and KL-weight schedules as pure functions of the epoch."""

from __future__ import annotations

from collections.abc import Callable

from .config import TrainConfig
from .registry import Registry

#: the IWAE paper runs 8 passes; pass i lasts 3^i epochs (3,280 epochs in all)
IWAE_PASSES = 8


def iwae_pass(epoch: int) -> int:
    """Index i of the IWAE-paper pass that 0-based ``epoch`` falls in (capped at the last)."""
    end = 0
    for i in range(IWAE_PASSES):
        end += 3**i
        if epoch < end:
            return i
    return IWAE_PASSES - 1


def iwae_epochs(passes: int) -> int:
    """Total epochs of the first ``passes`` passes: sum of 3^i."""
    return sum(3**i for i in range(passes))


#: ``train.schedule`` -> the multiplier of ``train.lr`` in 0-based epoch e
SCHEDULES: Registry[Callable[[int], float]] = Registry("schedule", {
    "constant": lambda epoch: 1.0,
    # the IWAE paper: lr * 10^(-i/7) in pass i
    "iwae": lambda epoch: 10 ** (-iwae_pass(epoch) / 7),
})


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """lr for 0-based ``epoch`` under ``cfg.schedule``."""
    return cfg.lr * SCHEDULES.get_checked(cfg.schedule, "train.schedule")(epoch)


def kl_weight(epoch_progress: float, warmup_epochs: int) -> float:
    """Linear KL warm-up from 0 to 1 over ``warmup_epochs`` (fractional epochs allowed)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, epoch_progress / warmup_epochs))
