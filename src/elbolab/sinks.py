"""Where a run's per-epoch rows go besides metrics.jsonl: TensorBoard and Weights & Biases.

Each sink takes the same row the trainer appends to metrics.jsonl. W&B logs numbers as
scalars under their key, a list (per-unit KL, active units per layer) as one scalar per
entry, ``kl_per_unit/07``. TensorBoard groups the tags (:func:`tensorboard_tag`: bounds/,
monitor/, train/, time/), shows the per-unit KL as one histogram, and at the monitor's
epochs the figures ``elbolab diagnose`` draws (images/...). Both packages are
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

import numpy as np

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


#: the row's keys TensorBoard shows under monitor/ (diagnostics.monitor's numbers)
MONITOR_KEYS = ("active_units", "active_units_per_layer", "kl_per_unit", "mutual_information",
                "mutual_information_stderr", "monitor_points", "monitor_seconds")


def tensorboard_tag(key: str) -> str:
    """A metrics.jsonl key as TensorBoard shows it, in a group: bounds/train_bound,
    bounds/valid_iwae_5, monitor/active_units, time/seconds, train/lr, ..."""
    if key.startswith(("train_bound", "valid_")):
        return f"bounds/{key}"
    if key.split("/", 1)[0] in MONITOR_KEYS:
        return f"monitor/{key}"
    if key == "seconds":
        return "time/epoch_seconds"
    return f"train/{key}"


class TensorBoardSink:
    """Event files in ``RUN/tensorboard``; a resumed run purges the events after its checkpoint.
    Scalars in groups (:func:`tensorboard_tag`), ``monitor/kl_per_unit`` as one histogram over
    the units, and the monitor's figures as images (:meth:`log_images`)."""

    def __init__(self, run_dir: Path, first_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_epoch if first_epoch > 1 else None)

    def log(self, row: dict[str, Any], step: int) -> None:
        kl = row.get("kl_per_unit")
        for name, value in scalars({k: v for k, v in row.items() if k != "kl_per_unit"}):
            self.writer.add_scalar(tensorboard_tag(name), value, step)
        if kl:
            self.writer.add_histogram(tensorboard_tag("kl_per_unit"), np.asarray(kl, dtype=np.float64), step)
        self.writer.flush()

    def log_images(self, images: dict[str, Any], step: int) -> None:
        """``[H, W, 3]`` arrays in [0, 1] (diagnostics.monitor.CollapseMonitor.images) under images/."""
        for name, image in images.items():
            self.writer.add_image(f"images/{name}", image, step, dataformats="HWC")
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
