"""What several commands share: the options that place a run, and opening a run with its data."""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import limits
from ..api import run_data
from ..data import DATASETS, USER, ImageDataset
from ..devices import resolve_device
from ..runs import WEIGHTS, Run, load_run

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NUMERICAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

log = logging.getLogger("elbolab")


def strict_json(obj: Any, indent: int | None = None) -> tuple[str, list[str]]:
    """``obj`` as standard JSON, which has no inf or NaN: those are written as null. Also returns
    the dotted keys where that happened, for a message."""
    bad: list[str] = []

    def clean(x: Any, key: str) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(key or "(value)")
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(x)]
        return x

    return json.dumps(clean(obj, ""), indent=indent, allow_nan=False), bad


def data_dir_unused(data_dir: str | None, dataset_name: str) -> str | None:
    """Why ``--data-dir`` is not read for ``dataset_name`` (embedded or passed-in data), else None."""
    if not data_dir:
        return None
    if dataset_name == USER:
        return "the run trained on data passed in from Python, which is not read from a data directory"
    if DATASETS.knows(dataset_name) and DATASETS[DATASETS.canonical(dataset_name)].embedded:
        return (f"{DATASETS.canonical(dataset_name)} ships inside the package; to train on the files there, "
                "name their dataset (--set data.name=binarized-mnist, mnist, ...; `elbolab data list`)")
    return None


def warn_if_data_dir_unused(data_dir: str | None, dataset_name: str) -> None:
    why = data_dir_unused(data_dir, dataset_name)
    if why:
        log.warning("--data-dir %s is not used: %s", data_dir, why)


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the dataset files (else $ELBOLAB_DATA, else the user cache)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")


def add_run_options(p: argparse.ArgumentParser, split_flag: str = "--split", runs: bool = False) -> None:
    """RUN (or RUN... with ``runs``), --weights, --data-file, --data-dir, --device and the split to read."""
    if runs:
        p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    else:
        p.add_argument("run", help="run folder")
    p.add_argument(split_flag, default="test", dest="split", help="data split (default: test)")
    p.add_argument("--weights", default="final", choices=list(WEIGHTS),
                   help="final, best (on validation) or last (the checkpoint)")
    p.add_argument("--data-file", help="the split's images as .npy, or a .npz of train/valid/test arrays: "
                   "for a run trained on data passed in from Python (run.json data_source in-memory)")
    add_data_dir(p)
    add_device(p)


@dataclass
class OpenRun:
    run: Run
    dataset: ImageDataset
    #: the split's images as the run scores them, on the device
    x: Tensor
    device: torch.device


def open_run(args: argparse.Namespace, run_path: str | None = None) -> OpenRun:
    """The run folder (``run_path``, else ``args.run``), its dataset and the split's evaluation
    images, on ``--device``."""
    device = resolve_device(args.device or "cpu", "--device")
    run = load_run(run_path or args.run, device=str(device), weights=args.weights)
    if not args.data_file:
        warn_if_data_dir_unused(args.data_dir, run.config.data.name)
    rd = run_data(run, args.data_file, args.split, args.data_dir, device)
    return OpenRun(run, rd.dataset, rd.x, device)


def positive(value: int | None, option: str, hi: int = limits.MAX_BATCH) -> None:
    """Refuse a count outside [1, hi] for ``option`` (None: left at its default); limits.py holds the caps."""
    limits.optional_count(value, option, hi)
