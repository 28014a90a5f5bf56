"""The Python API: train on your own data, then evaluate, diagnose and reload the run.

    import elbolab
    run = elbolab.train(x_train, test=x_test, out="runs/mine", **{"objective.k": 10})
    elbolab.evaluate(run)                      # test ELBO, L_k, log p(x) (IS) +- stderr, active units
    elbolab.diagnose(run)                      # diagnostics.md / .json and figures in the run folder
    run = elbolab.load_run("runs/mine")        # later, in another process: pass in-memory data again
    elbolab.evaluate(run, x_test)

Data passed in trains under the dataset name ``user``; run.json's ``data_source`` says
where it came from (files and their SHA-256, or in-memory with a checksum per split), and
:func:`run_data` is how every command, here and in the CLI, gets a run's data back or
says in one line what it needs. Models elbolab did not build (``elbolab.adapters``) go
through the same :func:`evaluate` and :func:`diagnose`, and :func:`train_model` trains
them with elbolab's objectives and gradient estimators.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import limits
from .config import PRESETS, ConfigError, ObjectiveConfig, RunConfig, load_config, preset
from .data import USER, DataError, ImageDataset, as_dataset, evaluation_images, load
from .data.user import matches, reload_files
from .devices import resolve_device
from .diagnostics.gradient_snr import snr_sweep
from .diagnostics.monitor import run_monitor
from .diagnostics.report import diagnose as write_diagnostics
from .diagnostics.summary import summarize
from .models.base import HasLogWeights, NoPosterior
from .objectives import make_objective
from .preflight import preflight
from .runs import Run, load_run
from .training import StepRun, make_step, train_runs

log = logging.getLogger("elbolab")

__all__ = ["RunData", "config_for", "diagnose", "evaluate", "load_run", "run_data", "snr", "train", "train_model"]


# --- configs ------------------------------------------------------------------------------


def config_for(config: RunConfig | str | Path | Mapping[str, Any] | None = None,
               overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A RunConfig from a config object, a preset name, a YAML/JSON path or a mapping, plus
    dotted overrides (``{"objective.k": 10}``); every key is checked as the CLI checks it."""
    if config is None:
        cfg = RunConfig()
    elif isinstance(config, RunConfig):
        cfg = config
    elif isinstance(config, str) and config in PRESETS:
        cfg = preset(config)
    elif isinstance(config, str | Path):
        cfg = load_config(config)
    elif isinstance(config, Mapping):
        dotted = any("." in str(k) for k in config)
        cfg = RunConfig().with_overrides(dict(config)) if dotted else RunConfig.from_dict(dict(config))
    else:
        raise ConfigError(f"config: expected a RunConfig, a preset name, a file or a mapping, got "
                          f"{type(config).__name__}")
    return cfg.with_overrides(dict(overrides)) if overrides else cfg


def _default_out(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.name}-{cfg.model.name}-{cfg.objective.name}{cfg.objective.k}-{stamp}"


# --- training --------------------------------------------------------------------------------


def train(data: Any = None, out: str | Path | None = None, config: Any = None, *, valid: Any = None,
          test: Any = None, resume: bool | None = None, **overrides: Any) -> Run:
    """Train a model on ``data`` into the run folder ``out`` and return the run (model in eval mode).

    ``data``: images ``[N, ...]`` (a tensor, numpy array or torch ``Dataset``; 0/1, grey
    levels in [0, 1] or uint8 0..255), a mapping of splits (train / valid / test), a .npy
    or .npz path, or None for the dataset the config names. ``valid`` / ``test`` add those
    splits. ``config``: a RunConfig, preset name, YAML path or mapping; ``overrides``
    are dotted keys: ``train(x, **{"objective.k": 10, "train.epochs": 20})``.
    An unfinished run of the same config in ``out`` is continued (``resume`` as in RunState.prepare_run_dir).
    """
    cfg = config_for(config, overrides)
    preflight(cfg)
    if data is None:
        if valid is not None or test is not None:
            raise ConfigError("valid= / test=: give the training data too (data=...)")
        dataset = load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
    else:
        if cfg.data.name != USER:
            cfg = cfg.with_overrides({"data.name": USER})
        dataset = as_dataset(data, valid=valid, test=test).with_validation(cfg.data.validation)
    run_dir = Path(out) if out is not None else _default_out(cfg)
    train_runs([(cfg, run_dir)], resume=resume, dataset=dataset, monitors=run_monitor, skip_finished=False)
    run = load_run(run_dir, device=str(resolve_device(cfg.train.device)))
    run.data = dataset if data is not None else None
    return run


def train_model(model: Any, data: Any, *, epochs: int = 10, batch_size: int = 100, lr: float = 1e-3,
                objective: str = "iwae", k: int = 5, estimator: str = "standard", seed: int = 0,
                optimizer: torch.optim.Optimizer | None = None, progress: bool = True) -> list[float]:
    """Train a model elbolab did not build (an adapter) with an elbolab objective; returns
    the mean training bound of each epoch, in nats.

    ``data``: a float tensor ``[N, D]`` used as it is (any real values, for models with
    their own likelihood), or images as :func:`train` takes them (scored as floats in
    [0, 1]). ``objective``/``k``/``estimator`` as in the config (``"dreg"`` and ``"stl"``
    need the model's ``log_weight_terms(stop_posterior_grad=...)`` and its encoder /
    decoder split). A step whose loss or gradients are not finite is skipped (logged).
    The model stays yours: save it with its own library's means. ``progress``: one line per
    epoch on the ``elbolab`` logger (shown by default; ``elbolab.set_verbosity("warning")``).
    """
    cfg = ObjectiveConfig(name=objective, k=k, estimator=estimator)
    cfg.validate("objective")
    objective_fn = make_objective(cfg)
    device = next(iter(model.parameters())).device
    if isinstance(data, Tensor) and data.is_floating_point():
        x_all = data.reshape(data.shape[0], -1)
    else:
        x_all = (data if isinstance(data, ImageDataset) else as_dataset(data)).as_float("train")
    x_all = x_all.to(device)
    run = StepRun.plain(model, optimizer or torch.optim.Adam(model.parameters(), lr=lr), objective_fn, cfg)
    if hasattr(model, "adversary_parameters"):  # trained against an adversary (models.avb): two optimizers
        if (objective, k, estimator) != ("vae", 1, "standard"):
            raise ConfigError("train_model: a model trained with an adversary takes objective='vae', k=1, "
                              "estimator='standard' (its q(z|x) has no density)")
        run.optimizer = optimizer or torch.optim.Adam(model.vae_parameters(), lr=lr)
        run.adversary_optimizer = torch.optim.Adam(model.adversary_parameters(), lr=lr * model.adversary_lr_ratio)
    step = make_step([run])  # the loop's step, for one run
    shuffle = torch.Generator().manual_seed(seed)
    bounds: list[float] = []
    model.train()
    for epoch in range(epochs):
        total = count = 0.0
        for idx in torch.randperm(x_all.shape[0], generator=shuffle).split(batch_size):
            x = x_all[idx.to(device)]
            (_, bound_sum, taken), = step.step(x[None], [1.0])
            if taken:
                total, count = total + bound_sum, count + x.shape[0]
            else:
                log.warning("epoch %d: non-finite loss or gradient; step skipped", epoch + 1)
        bounds.append(total / count if count else math.nan)
        if progress:
            log.info("epoch %d/%d: bound %.3f", epoch + 1, epochs, bounds[-1])
    model.eval()
    return bounds


# --- a run's data ---------------------------------------------------------------------------


@dataclass
class RunData:
    #: the dataset the images come from
    dataset: ImageDataset
    #: [N, D] float images of the split, as the run scores them (its binarization applied)
    x: Tensor
    split: str
    #: True / False: the split equals / differs from the one the run recorded; None: none recorded
    matches_recorded: bool | None


def _as_run(target: Any) -> Run:
    return target if isinstance(target, Run) else load_run(target)


def _given(data: Any, split: str) -> ImageDataset:
    """Data handed to a command: a dataset, a mapping / .npz of splits, or the split's images."""
    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, Mapping) or (isinstance(data, str | Path) and Path(data).suffix == ".npz"):
        return as_dataset(data, require_train=False)
    return as_dataset(data) if split == "train" else _single_split(data, split)


def _single_split(images: Any, split: str) -> ImageDataset:
    """Images for one split, stored as a dataset of that split alone."""
    ds = as_dataset(images)
    return ImageDataset(ds.name, {split: ds.split("train")}, ds.image_shape, ds.binary,
                        {split: ds.labels["train"]} if "train" in ds.labels else {}, ds.source, origin=dict(ds.origin))


def _recorded_dataset(run: Run, data_dir: str | Path | None, split: str) -> ImageDataset:
    """The data a run names: reloaded by name or from its files, or a one-line error saying what to pass."""
    if run.data is not None:
        return run.data
    cfg = run.config
    source = run.info.get("data_source") or {}
    kind = source.get("kind", "registered")
    if kind == "files":
        return reload_files(source, str(run.path)).with_validation(cfg.data.validation)
    if kind == "in-memory" or cfg.data.name == USER:
        raise DataError(f"{run.path}: trained on data passed in from Python ({source.get('name', cfg.data.name)!r}, "
                        f"in memory, not reloadable): pass it again, elbolab.evaluate(run, x_{split}) / "
                        f"diagnose(run, x_{split}), or save it with numpy.save and give --data-file FILE.npy")
    return load(cfg.data.name, data_dir or cfg.data.data_dir, validation=cfg.data.validation)


def run_data(run: Run, data: Any = None, split: str = "test", data_dir: str | Path | None = None,
             device: torch.device | str | None = None) -> RunData:
    """The images of ``split`` that ``run`` is scored on: from ``data`` when given, else the
    data the run recorded (reloaded, or a one-line :class:`DataError` saying what to pass).

    Given data is checked against the run's image size (one line when it differs) and
    against the recorded checksum of that split (a warning when it differs).
    """
    cfg = run.config
    if data is None:
        dataset = _recorded_dataset(run, data_dir, split)
    else:
        dataset = _given(data, split)
        if "train" in dataset.splits and "valid" not in dataset.splits and cfg.data.validation:
            dataset = dataset.with_validation(cfg.data.validation)
    if split not in dataset.splits:
        raise DataError(f"{run.path}: no {split!r} split in the data ({', '.join(dataset.splits)}); "
                        f"pass the {split} images (evaluate(run, x_{split}) / --data-file FILE.npy)")
    want = int(run.info.get("data_dim", dataset.data_dim))
    if dataset.data_dim != want:
        shape = "x".join(map(str, run.info.get("image_shape", [want])))
        raise DataError(f"{run.path}: the data has {dataset.data_dim} values per image "
                        f"({'x'.join(map(str, dataset.image_shape))}); the run's model takes {want} ({shape})")
    recorded = ((run.info.get("data_source") or {}).get("splits") or {}).get(split)
    same = matches(dataset.split(split), recorded) if data is not None else None
    if same is False:
        log.warning("%s: the %s data passed differs from the %s split the run recorded (SHA-256 %s...)",
                    run.path, split, split, recorded["sha256"][:12])
    x = evaluation_images(dataset, split, cfg.data.binarization, cfg.data.binarization_seed)
    dev = torch.device(device) if device is not None else next(iter(run.model.parameters())).device
    return RunData(dataset, x.to(dev), split, same)


# --- measuring ---------------------------------------------------------------------------------


def _model_and_data(target: Any, data: Any, split: str, data_dir: str | Path | None
                    ) -> tuple[Run | None, Any, Tensor, RunData | None]:
    """(run or None, model, images [N, D], run data) for a run / run folder / bare model."""
    if isinstance(target, HasLogWeights) and not isinstance(target, Run):
        if data is None:
            raise DataError(f"{type(target).__name__}: a model without a run folder needs the data: "
                            f"evaluate(model, x)")
        images = data if isinstance(data, Tensor) and data.is_floating_point() else None
        if images is None:
            ds = _given(data, split)
            images = ds.as_float(split if split in ds.splits else "train")
        device = next(iter(target.parameters())).device
        return None, target, images.reshape(images.shape[0], -1).to(device), None
    run = _as_run(target)
    rd = run_data(run, data, split, data_dir)
    return run, run.model, rd.x, rd


def check_snr_counts(ks: Sequence[int], draws: int, batch: int, seed: int,
                     names: Sequence[str] = ("ks", "draws", "batch", "seed")) -> None:
    """The limits (limits.py) on :func:`snr`'s counts, shared with ``elbolab snr`` (``names``: its options)."""
    if isinstance(ks, int | str) or not ks:
        raise ConfigError(f"{names[0]}: give one or more k values, got {ks!r}")
    for k in ks:
        limits.count(k, names[0], limits.MAX_SAMPLES)
    limits.count(draws, names[1], limits.MAX_EPOCHS, lo=2)  # two draws at least: a standard deviation
    limits.count(batch, names[2], limits.MAX_BATCH)
    limits.seed(seed, names[3])


def evaluate(target: Any, data: Any = None, *, split: str = "test", k: int | None = None,
             bound_k: int | None = None, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Test ELBO, L_k, the importance-sampled log p(x) with its standard error, and active units.

    ``target``: a :class:`Run`, a run folder, or a model (an adapter, or anything with
    ``log_weights``, ``posterior`` and ``latent_dims``; then ``data`` is required).
    ``k``: importance samples (default: the run's eval.k_importance, 1000);
    ``bound_k``: the k of L_k (default: the run's objective.k, 5). Both are checked against
    the limits the config and ``elbolab evaluate --k`` use (limits.py) before any data is read.
    """
    limits.optional_count(k, "k", limits.MAX_EVAL_SAMPLES)
    limits.optional_count(bound_k, "bound_k", limits.MAX_SAMPLES)  # objective.k's cap
    run, model, x, rd = _model_and_data(target, data, split, data_dir)
    e = run.config.eval if run is not None else RunConfig().eval
    kb = bound_k or (run.config.objective.k if run is not None else 5)
    report = summarize(model, x, kb, k or e.k_importance, e.batch_size, e.chunk_for(x.device),
                       e.active_unit_threshold, e.seed, progress=True)
    report["split"] = split
    if rd is not None:
        report["data_matches_recorded"] = rd.matches_recorded
    return report


def diagnose(target: Any, data: Any = None, *, out: str | Path | None = None, split: str = "test",
             k: int | None = None, points: int | None = None, data_dir: str | Path | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Every diagnostic (IS log-likelihood, bound vs k, active units, ELBO surgery, samples,
    q_EW for 2-D latents), written as diagnostics.md / .json and PNGs into ``out``
    (default: the run folder; required for a bare model). Returns the report as a dict.
    ``k`` and ``points`` are checked as ``elbolab diagnose --k / --points`` check them."""
    limits.optional_count(k, "k", limits.MAX_EVAL_SAMPLES)
    limits.optional_count(points, "points", limits.MAX_BATCH)
    run, model, x, rd = _model_and_data(target, data, split, data_dir)
    try:
        model.posterior(x[:1])
    except NoPosterior as e:
        raise NoPosterior(f"diagnose: {e}; evaluate() and elbolab.diagnostics.bound_vs_k need only log "
                          "weights") from None
    labels = rd.dataset.labels.get(split) if rd is not None else None
    if points:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:points].sort().values
        x = x[keep.to(x.device)]
        labels = labels[keep] if labels is not None else None
    if run is None:
        if out is None:
            raise ConfigError("out: a model without a run folder needs a folder for its report: diagnose(model, x, "
                              "out='diag')")
        run = Run(Path(out), RunConfig(), model, {})
    image_shape = rd.dataset.image_shape if rd is not None else _image_shape(model, x)
    return write_diagnostics(run, x, image_shape, Path(out) if out else run.path, k=k, split=split,
                             labels=labels, log=(lambda s: None) if quiet else print, progress=not quiet)


def _image_shape(model: Any, x: Tensor) -> tuple[int, ...]:
    shape = getattr(model, "image_shape", None)
    return tuple(shape) if shape else (1, x.shape[-1])


def snr(target: Any, data: Any = None, *, ks: Sequence[int] = (1, 5, 25, 125), estimators: Sequence[str] | None = None,
        draws: int = 100, batch: int = 20, seed: int = 0, split: str = "test",
        data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Gradient signal-to-noise ratio against k for each estimator, on the first ``batch`` images."""
    check_snr_counts(ks, draws, batch, seed)
    _, model, x, _ = _model_and_data(target, data, split, data_dir)
    names = list(estimators) if estimators else ["standard", "stl", "dreg"]
    return [r.to_dict() for r in snr_sweep(model, x[:batch], list(ks), names, n_draws=draws, seed=seed)]
