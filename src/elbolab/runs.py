"""A run folder: everything needed to reload, rerun and audit one training run.

    config.yaml        the full RunConfig
    run.json           elbolab version, data shape, status (running | finished | interrupted | failed)
    environment.json   package versions, git commit, CPU/GPU
    metrics.jsonl      one line per epoch
    model.safetensors  final weights (best.safetensors: best on validation)
    checkpoint.pt      last resumable state (tensors only; loaded with weights_only=True)
    report.json        the evaluation printed at the end

This module owns the folder: creating it, reading and writing checkpoints, deciding
whether a folder holds a run to continue, and ``load_run(path)``, which gives the model
back in one call. What a checkpoint holds is the trainer's business (training.py).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import ConfigError, RunConfig, load_config
from .data import data_source
from .files import atomic_torch_save, atomic_write_bytes, atomic_write_text, make_dir, remove_stale_temp_files
from .models import LatentVariableModel, build_model
from .version import __version__, same_major

log = logging.getLogger("elbolab")

CONFIG, INFO, ENVIRONMENT, METRICS = "config.yaml", "run.json", "environment.json", "metrics.jsonl"
CHECKPOINT, REPORT = "checkpoint.pt", "report.json"
#: ``--weights`` / ``load_run(weights=...)`` -> the file holding them
WEIGHTS = {"final": "model.safetensors", "best": "best.safetensors", "last": CHECKPOINT}

#: config keys that may differ between a run and its resumption: they do not change what
#: is trained. A run resumed on another device continues correctly, but draws its remaining
#: samples from that device's random stream, so it is bit-identical to an uninterrupted run
#: only on the device it stopped on.
RESUME_FREE_KEYS = ("data.data_dir", "train.progress", "train.compile", "train.device")


class RunError(RuntimeError):
    """A run folder is missing, incomplete or incompatible; the message names the file."""


@dataclass
class Run:
    path: Path
    config: RunConfig
    model: LatentVariableModel
    info: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    #: the data it trained on, when elbolab.train was handed it in this process (never saved)
    data: Any = None


def check_version(found: object, path: Path, what: str = "") -> None:
    """Refuse a file written by another major version of elbolab, naming it."""
    if not same_major(found):
        raise RunError(f"{path}: written by elbolab {found}, this is {__version__}{what}")


# --- weights and checkpoints -------------------------------------------------------------


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: weights file missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        why = " ".join(str(e).split())[:200]
        raise RunError(f"{path}: unreadable weights ({why}); the file is truncated or not safetensors") from None
    load_model_state(model, state, path)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """``model.load_state_dict(state)``, or a :class:`RunError` naming ``source``."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        why = " ".join(str(e).split())[:300]
        raise RunError(f"{source}: weights do not fit the configured model (another architecture?): {why}") from None


def save_checkpoint(state: dict[str, Any], run_dir: Path) -> None:
    """Write the trainer's state atomically; tensors and plain containers only."""
    atomic_torch_save({"elbolab": __version__, **state}, Path(run_dir) / CHECKPOINT)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling code (weights_only=True): a file that asks
    for anything but tensors and plain containers is refused, never run."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: checkpoint missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        why = " ".join(str(e).split())[:200]
        raise RunError(f"{path}: refused or unreadable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(state, dict) or "model" not in state or "elbolab" not in state:
        raise RunError(f"{path}: not an elbolab checkpoint")
    check_version(state["elbolab"], path)
    return state


# --- the folder's small files ---------------------------------------------------------------


def environment_info() -> dict[str, Any]:
    """What a reader needs to rerun this: versions, commit, hardware."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {
        "elbolab": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this an elbolab run folder?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def write_info(run_dir: Path, status: str, cfg: RunConfig, dataset: Any, epoch: int, step: int,
               error: str | None = None) -> None:
    """run.json: version, status, the data's name, shape and source, progress, the config."""
    info = {
        "elbolab": __version__,
        "status": status,
        "dataset": dataset.name,
        "data_source": data_source(dataset),
        "data_dim": dataset.data_dim,
        "image_shape": list(dataset.image_shape),
        "epochs_done": epoch,
        "step": step,
        "config": cfg.to_dict(),
    }
    if error:
        info["error"] = error
    write_json(Path(run_dir) / INFO, info)


# --- starting or continuing a run ---------------------------------------------------------


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ (ignoring :data:`RESUME_FREE_KEYS`)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y and prefix not in RESUME_FREE_KEYS:
            out.append(f"{prefix}: {x!r} -> {y!r}")

    walk(a.to_dict(), b.to_dict(), "")
    return out


def create_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """A new run folder holding the config and the environment; refused if the folder holds anything."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunError(f"{run_dir}: exists and is not an empty folder or an elbolab run; choose another --out")
    make_dir(run_dir)
    atomic_write_text(run_dir / CONFIG, cfg.to_yaml())
    write_json(run_dir / ENVIRONMENT, environment_info())


def holds_run(run_dir: Path) -> bool:
    return (Path(run_dir) / INFO).exists()


def open_unfinished_run(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """Check that ``run_dir`` holds an unfinished run of ``cfg`` and return its last checkpoint
    (None when it was killed before the first). Anything else is refused, the folder untouched."""
    info_path = run_dir / INFO
    info = read_json(info_path)
    check_version(info.get("elbolab", "?"), info_path, "; it cannot be resumed")
    try:
        saved = load_config(run_dir / CONFIG)
    except ConfigError as e:
        raise RunError(str(e)) from None
    diff = config_differences(saved, cfg)
    if diff:
        raise RunError(f"{run_dir}: holds a run of another config ({'; '.join(diff[:3])}"
                       f"{'; ...' if len(diff) > 3 else ''}); nothing was changed. "
                       f"Continue it with --resume {run_dir}, or choose another --out")
    if info.get("status") == "finished":
        raise RunError(f"{run_dir}: already holds a finished run of this config; choose another --out")
    for p in remove_stale_temp_files(run_dir):
        log.info("removed %s, left by a write that was killed half-way", p)
    ckpt = run_dir / CHECKPOINT
    return load_checkpoint(ckpt) if ckpt.exists() else None


def keep_metrics_upto(run_dir: Path, epoch: int) -> None:
    """Drop metrics rows of epochs after ``epoch`` (a resumed run trains them again)."""
    kept = [r for r in read_metrics(run_dir / METRICS) if r.get("epoch", 0) <= epoch]
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


# --- reloading ------------------------------------------------------------------------------


def load_run(path: str | Path, device: str = "cpu", weights: str = "final") -> Run:
    """Reload a run folder: its config, model (eval mode) and metrics.

    ``weights``: "final" (model.safetensors), "best" (best on validation) or "last"
    (the last checkpoint, e.g. of an unfinished run).
    """
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder")
    if weights not in WEIGHTS:
        raise RunError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    info = read_json(path / INFO)
    if not isinstance(info, dict) or "data_dim" not in info:
        raise RunError(f"{path / INFO}: not an elbolab run description")
    check_version(info.get("elbolab", "?"), path / INFO)
    try:
        cfg = load_config(path / CONFIG)
    except ConfigError as e:
        raise RunError(str(e)) from None
    try:
        model = build_model(cfg.model, int(info["data_dim"]), image_shape=info.get("image_shape"))
    except (ValueError, TypeError, KeyError) as e:
        raise RunError(f"{path / CONFIG}: describes a model this elbolab cannot build ({e})") from None
    if weights == "last":
        load_model_state(model, load_checkpoint(path / CHECKPOINT)["model"], path / CHECKPOINT)
    else:
        load_weights(model, path / WEIGHTS[weights])
    model.to(device).eval()
    report = read_json(path / REPORT) if (path / REPORT).exists() else None
    return Run(path, cfg, model, info, read_metrics(path / METRICS), report)
