"""A run folder: everything needed to reload, rerun and audit one training run.

    config.yaml        the full RunConfig
    run.json           elbolab version, data shape, status (running | finished | interrupted | failed)
    environment.json   package versions, git commit, CPU/GPU
    metrics.jsonl      one line per epoch
    model.safetensors  final weights (best.safetensors: best on validation)
    checkpoint.pt      last resumable state (tensors only; loaded with weights_only=True)
    report.json        the evaluation printed at the end

``load_run(path)`` gives the model back in one call.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import __version__
from .config import ConfigError, RunConfig, load_config
from .files import atomic_write_bytes, atomic_write_text
from .models import LatentVariableModel, build_model


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
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]
        raise RunError(f"{path}: weights do not fit the configured model (another architecture?): {why}") from None


def environment_info() -> dict[str, Any]:
    """What a reader needs to rerun this: versions, commit, hardware."""
    import numpy

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


def load_run(path: str | Path, device: str = "cpu", weights: str = "final") -> Run:
    """Reload a run folder: its config, model (eval mode) and metrics.

    ``weights``: "final" (model.safetensors), "best" (best on validation) or "last"
    (the last checkpoint, e.g. of an unfinished run).
    """
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder")
    info = read_json(path / "run.json")
    if not isinstance(info, dict) or "data_dim" not in info:
        raise RunError(f"{path / 'run.json'}: not an elbolab run description")
    major = str(info.get("elbolab", "?")).split(".")[0]
    if major != __version__.split(".")[0]:
        raise RunError(f"{path / 'run.json'}: written by elbolab {info.get('elbolab')}, this is {__version__}")
    try:
        cfg = load_config(path / "config.yaml")
    except ConfigError as e:
        raise RunError(str(e)) from None
    try:
        model = build_model(cfg.model, int(info["data_dim"]))
    except (ValueError, TypeError, KeyError) as e:
        raise RunError(f"{path / 'config.yaml'}: describes a model this elbolab cannot build ({e})") from None
    if weights == "last":
        from .training import load_checkpoint

        ckpt = load_checkpoint(path / "checkpoint.pt")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            why = " ".join(str(e).split())[:300]
            raise RunError(f"{path / 'checkpoint.pt'}: does not fit the configured model ({why})") from None
    else:
        name = {"final": "model.safetensors", "best": "best.safetensors"}.get(weights)
        if name is None:
            raise RunError(f"weights must be 'final', 'best' or 'last', got {weights!r}")
        load_weights(model, path / name)
    model.to(device).eval()
    report = read_json(path / "report.json") if (path / "report.json").exists() else None
    return Run(path, cfg, model, info, read_metrics(path / "metrics.jsonl"), report)
