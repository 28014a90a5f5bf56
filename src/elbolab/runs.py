"""A run folder: everything needed to reload, rerun and audit one training run.

    config.yaml        the full RunConfig
    run.json           elbolab version, data shape, status (running | finished | interrupted | failed);
                       for a model elbolab did not build (train_model), its class and tensors
    environment.json   package versions, git commit, CPU/GPU
    metrics.jsonl      one line per epoch
    model.safetensors  final weights (best.safetensors: best on validation)
    checkpoint.pt      last resumable state (tensors only; loaded with weights_only=True)
    report.json        the evaluation printed at the end
    .lock              flocked by the process that trains the run (one owner at a time)

This module owns the folder: creating it (atomically: built under a temporary name and
renamed, so a kill leaves either nothing or a run to resume), locking it, reading and
writing checkpoints and weights (each carrying the SHA-256 of its contents, checked on
load), deciding whether a folder holds a run to continue, and ``load_run(path)``, which
gives the model back in one call (``load_run(path, model=...)`` for a model elbolab did not
build). What a checkpoint holds is written down here too
(:class:`Checkpoint`: its fields, and the checks a damaged or crafted one fails), and
:func:`run_status` is how every caller tells whether a folder's run is finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .config import ConfigError, RunConfig, load_config
from .data import data_source
from .data.user import checksum
from .files import (
    DIR_MODE,
    OutputError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    fault_point,
    make_dir,
    remove_stale_temp_files,
    try_lock,
)
from .models import LatentVariableModel, build_model
from .version import __version__, same_major

log = logging.getLogger("elbolab")

CONFIG, INFO, ENVIRONMENT, METRICS = "config.yaml", "run.json", "environment.json", "metrics.jsonl"
CHECKPOINT, REPORT, LOCK = "checkpoint.pt", "report.json", ".lock"
#: while a run's test set is being scored: the points already scored (evaluation.log_likelihood)
PARTIAL_SCORES = "scores.partial.pt"
#: metrics lines that could not be read, kept here when a resume rewrites metrics.jsonl
BAD_LINES = METRICS + ".bad-lines"
#: checkpoint key / safetensors metadata key holding the SHA-256 of the contents
DIGEST = "sha256"
#: run.json key holding the SHA-256 of config.yaml as the run folder was created with it
CONFIG_DIGEST = "config_sha256"
#: ``--weights`` / ``load_run(weights=...)`` -> the file holding them
WEIGHTS = {"final": "model.safetensors", "best": "best.safetensors", "last": CHECKPOINT}

#: config keys that may differ between a run and its resumption: they do not change what
#: is trained. A run resumed on another device continues correctly, but draws its remaining
#: samples from that device's random stream, so it is bit-identical to an uninterrupted run
#: only on the device it stopped on; other thread counts or compiling change float rounding
#: only (reproduce sets the threads from --workers, which a rerun may change).
RESUME_FREE_KEYS = ("data.data_dir", "train.progress", "train.compile", "train.device", "train.threads")
#: the fused step compiled or as torch ops: the same training to float rounding (and ``auto`` already
#: falls back to the torch ops on a machine where the compiled step does not build)
RESUME_FREE_KEYS += ("train.fused_backend",)
#: where metrics go and what is monitored: never what is trained (the monitor restores every RNG)
RESUME_FREE_KEYS += ("train.tensorboard", "train.wandb", "train.wandb_mode", "train.wandb_project",
                     "train.monitor_every", "train.monitor_points")
#: sections free on resume but for the listed keys: evaluation settings are read after
#: training, except ``eval.seed``, which seeds the validation bound (best weights, early stop)
RESUME_FREE_SECTIONS = {"eval": ("eval.seed",)}


def resume_free(key: str) -> bool:
    """Whether the dotted config key may change between a run and its resumption."""
    section = key.split(".", 1)[0]
    return key in RESUME_FREE_KEYS or (section in RESUME_FREE_SECTIONS and key not in RESUME_FREE_SECTIONS[section])


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


def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's or weights' contents: every tensor's dtype, shape and bytes and
    every plain value, in a fixed order. Stored inside the file, so the file and its checksum are
    replaced by one rename; recomputed on load, it catches a flipped bit that the formats do not."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, list | tuple):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def _corrupt(path: Path, found: str, recorded: object) -> RunError:
    return RunError(f"{path}: checksum mismatch (contents hash to {found[:16]}..., the file records "
                    f"{str(recorded)[:16]}...); the file is corrupt, do not use it")


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={DIGEST: content_digest(state)}))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Read a .safetensors file into ``model``; its checksum (when it records one), dtypes and
    finiteness are checked first (files written before checksums load unchecked by the first)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: weights file missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST)
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = " ".join(str(e).split())[:200]
        raise RunError(f"{path}: unreadable weights ({why}); the file is truncated or not safetensors") from None
    if recorded is not None:
        found = content_digest(state)
        if found != recorded:
            raise _corrupt(path, found, recorded)
    load_model_state(model, state, path)


def check_model_state(model: torch.nn.Module, state: object, source: Path | str) -> None:
    """Refuse weights that would load only by a silent cast, or that hold inf/NaN: every tensor
    must have the dtype of the model's tensor of that name (keys of older layouts: the model's
    floating dtype) and be finite."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{source}: the weights are not a mapping of names to tensors")
    own = model.state_dict()
    floating = next((v.dtype for v in own.values() if v.is_floating_point()), torch.float32)
    for name, t in state.items():
        want = own[name].dtype if name in own else floating
        if t.dtype != want:
            raise RunError(f"{source}: {name} is {t.dtype}, the model holds {want}; "
                           "the file was altered or written for another model")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RunError(f"{source}: {name} holds inf/NaN values; the weights are unusable")


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """``model.load_state_dict(state)`` after :func:`check_model_state`, or a :class:`RunError` naming ``source``."""
    check_model_state(model, state, source)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        why = " ".join(str(e).split())[:300]
        raise RunError(f"{source}: weights do not fit the configured model (another architecture?): {why}") from None


def save_checkpoint(state: dict[str, Any], run_dir: Path) -> None:
    """Write the trainer's state atomically, with the SHA-256 of its contents; tensors and plain
    containers only."""
    payload = {"elbolab": __version__, **state}
    atomic_torch_save({**payload, DIGEST: content_digest(payload)}, Path(run_dir) / CHECKPOINT)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling code (weights_only=True): a file that asks
    for anything but tensors and plain containers is refused, never run. A checkpoint whose
    contents do not hash to the checksum it records is refused as corrupt."""
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
    if DIGEST in state:  # checkpoints written before checksums have none
        recorded = state.pop(DIGEST)
        found = content_digest(state)
        if found != recorded:
            raise _corrupt(path, found, recorded)
    if not isinstance(state["model"], dict):
        raise RunError(f"{path}: checkpoint field 'model' is {type(state['model']).__name__}, not a mapping of tensors")
    return state


def checkpoint_field(state: dict[str, Any], key: str, kind: type | tuple[type, ...], source: Path | str,
                     default: Any = ...) -> Any:
    """``state[key]`` checked to be a ``kind`` (a crafted or damaged checkpoint is named, not run)."""
    if key not in state:
        if default is not ...:
            return default
        raise RunError(f"{source}: checkpoint field {key!r} missing; not a complete elbolab checkpoint")
    value = state[key]
    bad_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    if not isinstance(value, kind) or bad_bool:
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RunError(f"{source}: checkpoint field {key!r} is {type(value).__name__} {str(value)[:40]!r}, "
                       f"expected {want}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise RunError(f"{source}: checkpoint field {key!r} is {value}, expected >= 0")
    return value


@dataclass
class Checkpoint:
    """What checkpoint.pt holds: a run's model and optimizer, its counters, its position inside
    the current epoch (permutation, next batch, running bound sums) and every RNG it draws from."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    #: completed epochs, and steps taken (skipped ones included)
    epoch: int
    step: int
    best_valid: float
    epochs_since_best: int
    nonfinite_skips: int
    finished: bool
    #: the current epoch's permutation (None until drawn), next batch, and the sums behind train_bound
    order: torch.Tensor | None
    next_batch: int
    bound_sum: float
    count: int
    rng: dict[str, Any]
    #: the adversary's optimizer, for a model trained against one (models.avb), else None
    adversary_optimizer: dict[str, Any] | None = None

    def to_state(self) -> dict[str, Any]:
        """The plain containers :func:`save_checkpoint` writes."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "step": self.step,
            "best_valid": self.best_valid,
            "epochs_since_best": self.epochs_since_best,
            "nonfinite_skips": self.nonfinite_skips,
            "finished": self.finished,
            "position": {"order": self.order, "next_batch": self.next_batch, "bound_sum": self.bound_sum,
                         "count": self.count},
            "rng": self.rng,
            **({} if self.adversary_optimizer is None else {"adversary_optimizer": self.adversary_optimizer}),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], source: Path | str, model: torch.nn.Module, n_images: int,
                   batch_size: int) -> Checkpoint:
        """Every field of a loaded checkpoint checked against the run it is to resume (``model``,
        ``n_images`` training images in batches of ``batch_size``): a damaged or crafted one is
        refused in one line naming the field."""
        f = checkpoint_field
        model_state = f(state, "model", dict, source)
        check_model_state(model, model_state, source)
        pos = f(state, "position", (dict, type(None)), source, None) or {}
        out = cls(
            model=model_state,
            optimizer=f(state, "optimizer", dict, source),
            epoch=f(state, "epoch", int, source),
            step=f(state, "step", int, source),
            best_valid=float(f(state, "best_valid", (float, int), source)),
            epochs_since_best=f(state, "epochs_since_best", int, source),
            nonfinite_skips=f(state, "nonfinite_skips", int, source, 0),
            finished=f(state, "finished", bool, source),
            order=f(pos, "order", (torch.Tensor, type(None)), source, None),
            next_batch=f(pos, "next_batch", int, source, 0),
            bound_sum=float(f(pos, "bound_sum", (float, int), source, 0.0)),
            count=f(pos, "count", int, source, 0),
            rng=f(state, "rng", dict, source),
            adversary_optimizer=f(state, "adversary_optimizer", (dict, type(None)), source, None),
        )
        order, n = out.order, n_images
        if order is not None:
            if order.numel() != n:
                raise RunError(f"{source}: its epoch permutation covers {order.numel()} images, "
                               f"the training split has {n}")
            if order.dtype != torch.int64 or order.dim() != 1 or not torch.equal(order.sort().values, torch.arange(n)):
                raise RunError(f"{source}: checkpoint field 'position.order' is not a permutation of the "
                               f"{n} training images")
        if out.next_batch > -(-n // batch_size):
            raise RunError(f"{source}: checkpoint field 'position.next_batch' is {out.next_batch}, "
                           "past the epoch's end")
        return out


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
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this an elbolab run folder?") from None
    except IsADirectoryError:
        raise RunError(f"{path}: is a folder, not a file") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = " ".join(str(e).split())[:200]
        raise RunError(f"{path}: unreadable ({why})") from None


def read_json_object(path: Path, what: str = "an elbolab run description") -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object (``{...}``)."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise RunError(f"{path}: holds a JSON {type(obj).__name__}, not {what}")
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@dataclass
class MetricsFile:
    """metrics.jsonl as read: the rows, the lines that are not rows, and whether the last line was torn."""

    rows: list[dict[str, Any]]
    #: (line number, the line as text) of every line that is not a row (a JSON object with an integer epoch)
    bad: list[tuple[int, str]] = field(default_factory=list)
    #: the last line was cut short (no newline, not JSON): a write killed half-way, dropped
    torn: bool = False


def scan_metrics(path: Path) -> MetricsFile:
    """Every row of metrics.jsonl. A line that does not parse is set aside, never allowed to hide
    the rows after it; only an unterminated last line (a kill mid-write) counts as torn."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return MetricsFile([])
    except IsADirectoryError:
        raise RunError(f"{path}: is a folder, not the metrics file") from None
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = data.split(b"\n")
    last_unterminated = lines[-1] != b""
    if not last_unterminated:
        lines.pop()
    out = MetricsFile([])
    for i, raw in enumerate(lines, start=1):
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if isinstance(row, dict) and _is_epoch(row.get("epoch")):
            out.rows.append(row)
        elif i == len(lines) and last_unterminated and row is None:
            out.torn = True
        elif raw.strip():
            out.bad.append((i, raw.decode("utf-8", "backslashreplace")))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; lines that are not rows are skipped with a warning."""
    scan = scan_metrics(path)
    if scan.bad:
        log.warning("%s: %d line(s) are not metrics rows (line %s); they are skipped", path, len(scan.bad),
                    ", ".join(str(n) for n, _ in scan.bad[:5]))
    return scan.rows


def run_info(status: str, cfg: RunConfig, dataset: Any, epoch: int, step: int,
             error: str | None = None, wrapped: dict[str, Any] | None = None) -> dict[str, Any]:
    """What run.json holds: version, status, the data's name, shape and source, progress, the config
    and, for a model elbolab did not build (``wrapped``: :func:`describe_model`), what it is."""
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
    if wrapped is not None:
        info[WRAPPED] = wrapped
    if error:
        info["error"] = error
    return info


def write_info(run_dir: Path, status: str, cfg: RunConfig, dataset: Any, epoch: int, step: int,
               error: str | None = None, wrapped: dict[str, Any] | None = None) -> None:
    """Rewrite run.json; the checksum of config.yaml recorded at creation is carried over."""
    info = run_info(status, cfg, dataset, epoch, step, error, wrapped)
    with contextlib.suppress(RunError, AttributeError):
        recorded = read_json(Path(run_dir) / INFO).get(CONFIG_DIGEST)
        if isinstance(recorded, str):
            info[CONFIG_DIGEST] = recorded
    write_json(Path(run_dir) / INFO, info)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except IsADirectoryError:
        raise RunError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror or e})") from None


def check_config_digest(run_dir: Path, info: dict[str, Any]) -> None:
    """Refuse a config.yaml that is not the one the run folder was created with (run.json records
    its SHA-256, as weights carry theirs): a hand-edited config would describe another model than
    the one trained. Folders written before the checksum have none and load unchecked."""
    recorded = info.get(CONFIG_DIGEST)
    if recorded is None:
        return
    path = Path(run_dir) / CONFIG
    found = _sha256(path)
    if found != recorded:
        raise RunError(f"{path}: edited after the run was created (SHA-256 {found[:12]}..., run.json records "
                       f"{str(recorded)[:12]}...); restore it, or train a new run with the new config")


def _data_fingerprint(source: Any, dataset: Any = None) -> dict[str, str]:
    """The checksums that identify a run's data: per split (data passed in: in memory or files) or per
    data file (a registered dataset); with ``dataset``, in-memory checksums of its splits are taken."""
    if not isinstance(source, dict):
        return {}
    kind = source.get("kind")
    if kind in ("in-memory", "files") and isinstance(source.get("splits"), dict):
        out = {f"{kind} {split}": f.get("sha256") for split, f in source["splits"].items() if isinstance(f, dict)}
        if kind == "files" and dataset is not None:  # the same images may come back in memory
            out.update({f"in-memory {split}": checksum(dataset.split(split)) for split in source["splits"]
                        if split in dataset.splits})
        return {k: str(v) for k, v in out.items() if v}
    if kind == "registered" and isinstance(source.get("files"), dict):
        return {f"file {Path(p).name}": str(h) for p, h in source["files"].items()}
    return {}


def check_same_data(run_dir: Path, info: dict[str, Any], dataset: Any) -> None:
    """Refuse to continue a run on other data than it trained on: run.json's data checksums would
    become false. Compared where both record the same thing (a split's or a file's checksum)."""
    recorded = _data_fingerprint(info.get("data_source"))
    if not recorded:
        return
    given = _data_fingerprint(data_source(dataset), dataset)
    for key in sorted(set(recorded) & set(given)):
        if recorded[key] != given[key]:
            raise RunError(f"{run_dir}: trained on other data ({key} SHA-256 {recorded[key][:12]}... recorded "
                           f"in {INFO}, {given[key][:12]}... given); nothing was changed. Pass the same data, "
                           "or choose another out folder")


# --- models elbolab did not build ------------------------------------------------------------

#: run.json key describing a model elbolab did not build (elbolab.train_model): its class and tensors
WRAPPED = "wrapped_model"


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """What run.json records of a model elbolab did not build: its class and each tensor of its
    state (dtype and shape), which is what its checkpoints and weights must fit."""
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "name": str(getattr(model, "model_name", cls.__name__)),
        "tensors": {k: f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" for k, v in model.state_dict().items()},
    }


def model_differences(recorded: Any, given: dict[str, Any]) -> list[str]:
    """How ``given`` (:func:`describe_model`) differs from the description a run folder recorded."""
    if not isinstance(recorded, dict):
        return [f"model: elbolab's own {recorded!r} -> {given['class']}" if recorded else
                f"model: none recorded -> {given['class']}"]
    if recorded.get("class") != given["class"]:
        return [f"model class: {recorded.get('class')} -> {given['class']}"]
    old, new = recorded.get("tensors") or {}, given["tensors"]
    return [f"model tensor {k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_same_model(run_dir: Path, info: dict[str, Any], wrapped: dict[str, Any] | None) -> None:
    """Refuse to continue or reload a run into another model than the one it trained, naming what differs."""
    recorded = info.get(WRAPPED)
    if wrapped is None:
        if recorded is not None:
            raise RunError(f"{run_dir}: trained a model elbolab did not build ({recorded.get('class')}); pass one "
                           "of its kind: elbolab.load_run(path, model=...) / elbolab.train_model(model, ...)")
        return
    if recorded is None:
        raise RunError(f"{run_dir}: holds a run of elbolab's own model, not of the model given; choose another "
                       "out folder (load_run(path) rebuilds its model)")
    diff = model_differences(recorded, wrapped)
    if diff:
        raise RunError(f"{run_dir}: trained another model ({describe_differences(diff)}); nothing was changed. "
                       "Pass the same model, or choose another out folder")


# --- starting or continuing a run ---------------------------------------------------------


def config_differences(a: RunConfig, b: RunConfig, free: bool = False) -> list[str]:
    """Dotted keys whose values differ, as ``key: old -> new``: those that change the result
    (``free=False``: :func:`resume_free` keys ignored) or only the free ones (``free=True``)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y and resume_free(prefix) == free:
            out.append(f"{prefix}: {x!r} -> {y!r}")

    walk(a.to_dict(), b.to_dict(), "")
    return out


def describe_differences(diff: list[str]) -> str:
    return "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")


class RunLock:
    """The exclusive lock of a run folder: whoever holds it trains the run. The OS releases it
    when the process ends, however it ends, so a killed owner never blocks a resume."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


#: the files a run's owner writes (with their temp files, ``.NAME.*.tmp``, left by a killed write)
OWNED = (CONFIG, INFO, ENVIRONMENT, METRICS, BAD_LINES, CHECKPOINT, REPORT, *dict.fromkeys(WEIGHTS.values()))


def check_no_links(folder: Path, names: Iterable[str]) -> None:
    """Refuse a folder whose own files are symbolic links: writing or appending through one would
    change a file outside the folder."""
    for name in names:
        p = Path(folder) / name
        if p.is_symlink():
            raise RunError(f"{p}: is a symbolic link (to {os.readlink(p)}); elbolab writes only inside the folder, "
                           "replace it with the file itself")


def remove_owned_temp_files(folder: Path, names: Iterable[str]) -> None:
    """Delete the temp files that killed writes of ``names`` left (only the folder's owner calls this)."""
    for name in names:
        for p in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                log.info("removed %s, left by a write that was killed half-way", p)


def lock_run(run_dir: Path) -> RunLock:
    """Take the run folder's lock, or refuse in one line when another process holds it. The owner
    then removes the temp files killed writes left; a folder whose files are links is refused."""
    check_no_links(run_dir, (*OWNED, LOCK))
    fd = try_lock(Path(run_dir) / LOCK)
    if fd is None:
        raise RunError(f"{run_dir}: in use by another elbolab process (a train or resume of this run is "
                       "still running); wait for it to end, or stop it")
    remove_owned_temp_files(run_dir, OWNED)
    return RunLock(fd)


#: files a run folder holds before its run.json: a folder with only these (and temp files)
#: is a creation killed by an older elbolab, which wrote them in place; it is started afresh
_CREATION_FILES = {CONFIG, ENVIRONMENT, LOCK}


def _unstarted(run_dir: Path) -> bool:
    names = [p.name for p in run_dir.iterdir()]
    return all(n in _CREATION_FILES or (n.startswith(".") and n.endswith(".tmp")) for n in names)


def _remove_abandoned_creations(run_dir: Path) -> None:
    """Delete temporary folders left beside ``run_dir`` by creations that were killed: their lock is
    free (a live creator holds it); one without a lock file yet is left for a minute."""
    for tmp in run_dir.parent.glob(f".{run_dir.name}.new-*"):
        lock = tmp / LOCK
        if lock.exists():
            fd = try_lock(lock)
            if fd is None:
                continue
            os.close(fd)
        elif time.time() - tmp.stat().st_mtime < 60:
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def create_run_dir(run_dir: Path, cfg: RunConfig, info: dict[str, Any]) -> RunLock | None:
    """Create the run folder atomically and hold its lock: config.yaml, environment.json and
    run.json (``info``) are written into a temporary folder beside it, which is then renamed,
    so a kill or a full disk at any instant leaves either no run folder or a complete one.

    Refused if ``run_dir`` holds anything else. Returns None when another process created the
    run in the meantime (the caller then treats it as an existing run).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: exists and is not a folder; choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not _unstarted(run_dir):
            raise RunError(f"{run_dir}: exists and is not an empty folder or an elbolab run; choose another --out")
        log.warning("%s: holds only the first files of a run whose creation was killed; starting it afresh", run_dir)
        for p in run_dir.iterdir():
            p.unlink()
    make_dir(run_dir.parent)
    _remove_abandoned_creations(run_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.new-", dir=run_dir.parent))
    except OSError as e:
        raise OutputError(f"cannot create a folder in {run_dir.parent}: {e.strerror or e}") from None
    lock = None
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp's 0700 -> what mkdir gives
        lock = RunLock(try_lock(tmp / LOCK))  # a fresh folder: nobody else holds it
        text = cfg.to_yaml()
        atomic_write_text(tmp / CONFIG, text)
        write_json(tmp / ENVIRONMENT, environment_info())
        write_json(tmp / INFO, {**info, CONFIG_DIGEST: hashlib.sha256(text.encode()).hexdigest()})
        fault_point("create:rename")
        try:
            os.rename(tmp, run_dir)  # replaces an empty folder; fails on a non-empty one
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (run_dir / INFO).exists():
                lock.release()
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            raise OutputError(f"cannot create {run_dir}: {e.strerror or e}") from None
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable
        dfd = os.open(run_dir.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return lock


def holds_run(run_dir: Path) -> bool:
    return (Path(run_dir) / INFO).exists()


#: what :func:`run_status` says of a folder holding no run
NO_RUN = "none"
#: run.json says finished but the final weights are missing
DAMAGED = "damaged"


def run_status(run_dir: str | Path) -> str:
    """Where a run folder's run stands: :data:`NO_RUN`, run.json's status (running, interrupted,
    failed, finished) or :data:`DAMAGED` (finished without its final weights). An unreadable
    run.json is a :class:`RunError` naming it."""
    run_dir = Path(run_dir)
    if not holds_run(run_dir):
        return NO_RUN
    status = str(read_json_object(run_dir / INFO).get("status"))
    if status == "finished" and not (run_dir / WEIGHTS["final"]).exists():
        return DAMAGED
    return status


def check_config_unedited(run_dir: Path, info: dict[str, Any], saved: RunConfig) -> None:
    """Refuse a config.yaml edited after the run started: the epochs already trained followed the
    config run.json records, and the folder must keep describing them."""
    recorded = info.get("config")
    if not isinstance(recorded, dict):
        return  # run.json of an older elbolab: nothing to compare with
    try:
        trained = RunConfig.from_dict(recorded)
    except ConfigError:
        return
    diff = config_differences(trained, saved)
    if diff:
        raise RunError(f"{run_dir / CONFIG}: edited after the run started ({describe_differences(diff)}; run.json "
                       "records what was trained); restore it, or start a new run with the new config")


def open_unfinished_run(run_dir: Path, cfg: RunConfig, dataset: Any = None,
                        wrapped: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Check that ``run_dir`` holds an unfinished run of ``cfg`` (trained on ``dataset``, when given;
    of the model ``wrapped`` describes, or else of elbolab's own) and return its last checkpoint
    (None when it was killed before the first). Anything else is refused, the folder untouched."""
    info_path = run_dir / INFO
    info = read_json_object(info_path)
    check_version(info.get("elbolab", "?"), info_path, "; it cannot be resumed")
    check_same_model(run_dir, info, wrapped)
    try:
        saved = load_config(run_dir / CONFIG)
    except ConfigError as e:
        raise RunError(str(e)) from None
    check_config_unedited(run_dir, info, saved)
    check_config_digest(run_dir, info)
    diff = config_differences(saved, cfg)
    if diff:
        raise RunError(f"{run_dir}: holds a run of another config ({describe_differences(diff)}); nothing was "
                       f"changed. Continue it with --resume {run_dir}, or choose another --out")
    if info.get("status") == "finished":
        raise RunError(f"{run_dir}: already holds a finished run of this config; choose another --out")
    if dataset is not None:
        check_same_data(run_dir, info, dataset)
    for p in remove_stale_temp_files(run_dir):
        log.info("removed %s, left by a write that was killed half-way", p)
    ckpt = run_dir / CHECKPOINT
    return load_checkpoint(ckpt) if ckpt.exists() else None


def keep_metrics_upto(run_dir: Path, epoch: int) -> None:
    """Drop metrics rows of epochs after ``epoch`` (a resumed run trains them again). Lines that are
    not rows are moved, with their line numbers, to metrics.jsonl.bad-lines, never dropped."""
    path = run_dir / METRICS
    scan = scan_metrics(path)
    if scan.bad:
        text = "".join(f"{n}\t{line}\n" for n, line in scan.bad)
        try:
            with (run_dir / BAD_LINES).open("a") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"cannot write {run_dir / BAD_LINES}: {e.strerror or e}; {path} is unchanged") from None
        log.warning("%s: %d line(s) are not metrics rows (line %s); moved to %s", path, len(scan.bad),
                    ", ".join(str(n) for n, _ in scan.bad[:5]), run_dir / BAD_LINES)
    kept = [r for r in scan.rows if r["epoch"] <= epoch]
    if kept != scan.rows or scan.bad or scan.torn:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _is_epoch(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- reloading ------------------------------------------------------------------------------


def load_run(path: str | Path, device: str = "cpu", weights: str = "final",
             model: torch.nn.Module | None = None) -> Run:
    """Reload a run folder: its config, model (eval mode) and metrics.

    ``weights``: "final" (model.safetensors), "best" (best on validation) or "last"
    (the last checkpoint, e.g. of an unfinished run). ``model``: for a run of a model
    elbolab did not build (elbolab.train_model), a model of its kind to load the weights into
    (refused, naming what differs, when its class or tensors are not the run's).
    """
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder")
    if weights not in WEIGHTS:
        raise RunError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    info = read_json_object(path / INFO)
    if "data_dim" not in info:
        raise RunError(f"{path / INFO}: not an elbolab run description")
    check_version(info.get("elbolab", "?"), path / INFO)
    try:
        cfg = load_config(path / CONFIG)
    except ConfigError as e:
        raise RunError(str(e)) from None
    check_config_digest(path, info)
    check_same_model(path, info, describe_model(model) if model is not None else None)
    if model is None:
        try:
            model = build_model(cfg.model, int(info["data_dim"]), image_shape=info.get("image_shape"))
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise RunError(f"{path / CONFIG}: describes a model this elbolab cannot build ({e})") from None
    if weights == "last":
        load_model_state(model, load_checkpoint(path / CHECKPOINT)["model"], path / CHECKPOINT)
    else:
        load_weights(model, path / WEIGHTS[weights])
    model.to(device).eval()
    report = read_json_object(path / REPORT, "an evaluation report") if (path / REPORT).exists() else None
    return Run(path, cfg, model, info, read_metrics(path / METRICS), report)
