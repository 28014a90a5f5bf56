"""Checks a run must pass before anything is written.

Names and ranges are checked when a config is built (elbolab.config); what is left needs the
machine: the device, the CPU count, the tools and optional packages an option relies on, and
the memory a step will take, estimated from the config and the built model before the first step.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from . import limits
from .config import ConfigError, RunConfig
from .devices import resolve_device
from .models import build_model
from .objectives import make_objective

#: the estimate below counts what autograd keeps for the backward pass; the step's peak also
#: holds the gradients flowing back through it (tests/test_preflight.py measures the ratio)
STEP_FACTOR = 2.0
#: an evaluation pass (no_grad) holds less than a training step keeps; measured ratio <= 1
EVAL_FACTOR = 1.0
#: a stacked step (elbolab.stacked) holds more per run than a run's step alone: the per-run views
#: and copies of the log-weight terms and the run-by-run elementwise tails (tests/test_sweep_faults.py
#: measures the ratio)
STACK_FACTOR = 1.5

#: config switch -> (the package it imports, the extra that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "train.tensorboard": ("tensorboard", "tensorboard"),
    "train.wandb": ("wandb", "wandb"),
}


def missing_package(module: str) -> bool:
    """Whether ``module`` cannot be imported here (found without importing it)."""
    try:
        return find_spec(module) is None
    except (ImportError, ValueError):
        return True


def check_optional_packages(cfg: RunConfig) -> None:
    """One line naming the extra to install for each switched-on option whose package is missing."""
    for key, (module, extra) in OPTIONAL_PACKAGES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) and missing_package(module):
            raise ConfigError(f"{key}=true needs the {module} package, which is not installed: "
                              f"pip install 'elbolab[{extra}]' (or set {key}=false)")


def preflight(cfg: RunConfig) -> None:
    """Refuse, with a one-line :class:`ConfigError` naming the option, what this machine cannot run."""
    cfg.validate()  # a config built field by field has not been checked yet
    check_optional_packages(cfg)
    device = resolve_device(cfg.train.device)
    limits.threads(cfg.train.threads, "train.threads")
    if cfg.train.compile and device.type != "cuda":
        compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise ConfigError("train.compile: torch.compile on a CPU needs a C++ compiler and none is on PATH "
                              "(c++, g++, clang++ or $CXX); install one or set train.compile=false")


# --- memory ------------------------------------------------------------------------------


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can get on ``device``: free GPU memory, or the CPU's MemAvailable
    (capped by a cgroup memory limit); None where neither can be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: a container's limit, minus what it already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _saved_bytes(model: torch.nn.Module, fn: Callable[[], object]) -> int:
    """Bytes of the activations autograd saves while ``fn`` runs (each storage counted once;
    the model's own parameters and buffers are not activations and are left out)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@dataclass(frozen=True)
class MemoryEstimate:
    #: bytes of the largest of: a training step, a validation pass, the final evaluation pass
    peak: int
    #: which pass it is, with the options that size it
    what: str
    #: the options to lower
    options: str


@dataclass(frozen=True)
class _Linear:
    """Bytes of a pass over ``b`` points with ``k`` sample rows each: ``const + b * (point + k * row)``."""

    const: float
    point: float
    row: float

    @classmethod
    def probe(cls, saved: Callable[[int, int], int]) -> _Linear:
        s11, s21, s23 = saved(1, 1), saved(2, 1), saved(2, 3)
        row = max(0.0, (s23 - s21) / 4)
        point = max(0.0, s21 - s11 - row)
        return cls(max(0.0, s11 - point - row), point, row)

    def at(self, b: int, k: int) -> float:
        return self.const + b * (self.point + k * self.row)


def estimate_memory(cfg: RunConfig, model: torch.nn.Module, data_dim: int, n_valid: int = 0,
                    runs: int = 1) -> MemoryEstimate:
    """Peak bytes of the run's largest pass, measured on the model itself: tiny probes (1-2 points,
    1-3 samples) count what autograd keeps per data point and per sample row, which every layer
    makes linear in both; that is scaled to the config's k x m x batch. Parameters count four times
    in a step (weights, gradients, Adam's two moments), once in an evaluation.

    ``runs``: a stack of that many runs of this shape (elbolab.stacked) steps them all in one pass,
    which keeps every run's activations and state at once; its runs are evaluated one at a time,
    beside the others' state."""
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    o = cfg.objective
    m = o.m if o.name in ("miwae", "piwae") else 1

    def step(b: int, k: int) -> int:
        objective = make_objective(dataclasses.replace(o, k=k, m=1))
        x = torch.full((b, data_dim), 0.5, dtype=dtype, device=device)
        return _saved_bytes(model, lambda: objective(model, x, 1.0))

    def evaluation(b: int, k: int) -> int:
        x = torch.full((b, data_dim), 0.5, dtype=dtype, device=device)
        if getattr(model, "implicit_posterior", False):  # no log weights (models.avb): the same pass's terms
            return _saved_bytes(model, lambda: model.log_weight_terms(x, k).log_weights())
        return _saved_bytes(model, lambda: model.log_weights(x, k))

    was_training = model.training
    model.train()
    try:  # the probes draw samples: fork the RNG so that the run's own stream is untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            train, score = _Linear.probe(step), _Linear.probe(evaluation)
    finally:
        model.train(was_training)
    params = sum(q.numel() * q.element_size() for q in model.parameters())
    b = cfg.train.batch_size
    step_what = "a training step" if runs == 1 else f"a stacked training step of {runs} runs"
    stacked = runs * (STACK_FACTOR if runs > 1 else 1.0)
    passes = [(stacked * STEP_FACTOR * train.at(b, o.k * m) + runs * 4 * params,
               f"{step_what} (objective.k={o.k}{f' x objective.m={m}' if m > 1 else ''} x train.batch_size={b})",
               "objective.k or train.batch_size" + (" or the runs of this shape" if runs > 1 else ""))]
    others = 4 * params * (runs - 1)  # the other runs' weights, gradients and Adam state
    if n_valid and cfg.train.eval_every:
        rows = min(500, n_valid)  # RunState.validate's batch
        passes.append((EVAL_FACTOR * score.at(rows, o.k) + params + others,
                       f"the validation bound (objective.k={o.k} x {rows} images)", "objective.k"))
    e = cfg.eval
    chunk = max(e.chunk_for(device), o.k)
    passes.append((EVAL_FACTOR * score.at(e.batch_size, chunk) + params + others,
                   f"the test evaluation (eval.batch_size={e.batch_size} x {chunk} samples)",
                   "eval.batch_size or eval.chunk_size"))
    peak, what, options = max(passes, key=lambda q: q[0])
    return MemoryEstimate(int(peak), what, options)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_parameter_memory(cfg: RunConfig, data_dim: int, device: torch.device, train_data: torch.Tensor,
                           dataset: str | None = None) -> None:
    """Refuse a model whose parameters (with gradients and Adam's moments) cannot fit, before building
    it for real: it is built on the meta device first, which allocates nothing."""
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, data_dim, train_data, dataset=dataset)
        count = sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a data-dependent init cannot run on meta; the real build decides
        return
    need, free = 4 * 4 * count, available_memory(device)  # float32 weights, gradients, two Adam moments
    if free is not None and need > free:
        raise ConfigError(f"model: {count:,} parameters need about {_gb(need)} with their gradients and Adam's "
                          f"state, this machine has {_gb(free)} available on {device}; use smaller layers")


def check_memory(cfg: RunConfig, model: torch.nn.Module, data_dim: int, n_valid: int = 0,
                 runs: int = 1) -> MemoryEstimate:
    """Refuse, before anything is written, a run (or a stack of ``runs`` runs of this shape) whose
    largest pass cannot fit in the memory available."""
    device = next(model.parameters()).device
    est = estimate_memory(cfg, model, data_dim, n_valid, runs)
    free = available_memory(device)
    if free is not None and est.peak > free:
        raise ConfigError(f"{est.options.split(' or ')[0]}: {est.what} needs about {_gb(est.peak)} (estimated), "
                          f"this machine has {_gb(free)} available on {device}; lower {est.options}")
    return est

