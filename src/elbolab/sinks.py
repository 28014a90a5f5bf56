"""Where a run's per-epoch rows go besides metrics.jsonl: TensorBoard and Weights & Biases.

Each sink takes the same row the trainer appends to metrics.jsonl. Numbers are logged
as scalars under their key; a list (per-unit KL, active units per layer) as one scalar
per entry, ``kl_per_unit/07``, so a dead unit is a flat line of its own. Both packages are
optional extras; preflight refuses a switched-on sink whose package is missing before
anything is created, so the imports here only fail if the package breaks on import.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .config import RunConfig

log = logging.getLogger("elbolab")

class MetricSink(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(name, value) for every number in ``row``, lists flattened to ``name/index``; the
    epoch (the step) and anything not a number are left out."""
    for key, value in row.items():
        name = f"{prefix}{key}"
        if key == "epoch" and not prefix:
            continue
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, int | float):
            if math.isfinite(value):
                yield name, float(value)
        elif isinstance(value, list | tuple):
            width = len(str(max(len(value) - 1, 0)))
            yield from scalars({f"{i:0{width}d}": v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, dict):
            yield from scalars(value, f"{name}/")


class TensorBoardSink:
    """Event files in ``RUN/tensorboard``; a resumed run purges the events after its checkpoint."""

    def __init__(self, run_dir: Path, first_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_epoch if first_epoch > 1 else None)

    def log(self, row: dict[str, Any], step: int) -> None:
        for name, value in scalars(row):
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run folder, so a resumed run logs into the run it started."""
    return "elbolab-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


class WandbSink:
    """A Weights & Biases run with the config; ``train.wandb_mode=offline`` writes files only
    (``RUN/wandb``, uploaded later with ``wandb sync``) and never touches the network."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        import wandb

        t = cfg.train
        self.run = wandb.init(project=t.wandb_project, mode=t.wandb_mode, dir=str(run_dir), name=run_dir.name,
                              id=wandb_run_id(run_dir), resume="allow", config=cfg.to_dict(),
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(dict(scalars(row)), step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg: RunConfig, run_dir: Path, first_epoch: int) -> list[MetricSink]:
    """The sinks the config switches on (``first_epoch``: the epoch the loop logs next).
    One that cannot start (W&B online without a network) is left out with a warning:
    metrics.jsonl holds every row either way."""
    wanted = []
    if cfg.train.tensorboard:
        wanted.append(("train.tensorboard", lambda: TensorBoardSink(run_dir, first_epoch)))
    if cfg.train.wandb:
        wanted.append(("train.wandb", lambda: WandbSink(run_dir, cfg)))
    sinks: list[MetricSink] = []
    for key, start in wanted:
        try:
            sinks.append(start())
        except Exception as e:  # noqa: BLE001 - any failure of a third-party logger
            log.warning("%s: could not start (%s: %s); training goes on without it", key, type(e).__name__,
                        str(e)[:200])
    return sinks
