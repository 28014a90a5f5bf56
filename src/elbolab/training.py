"""The training loop: batches, objective, optimizer, validation, checkpoints, resume.

No lost training: state is checkpointed atomically at every epoch end and, mid-epoch,
every ``train.checkpoint_minutes`` (or ``train.checkpoint_steps``), on Ctrl-C and on
SIGTERM. A checkpoint holds tensors and plain containers only (read back with
``weights_only=True``): model, optimizer, the position in the epoch (its permutation and
the next batch), early-stopping counters and every RNG the run draws from, so a resumed
run continues the very same stream of batches and samples; on CPU it ends bit-identical
to a run that was never interrupted. The run folder itself is runs.py's.

No silent NaN: each step checks its loss and gradients (one host sync per step, shared
with the bound that is logged anyway). A fault names the step, batch, images and the
terms or layers that went non-finite; ``train.nonfinite`` skips or stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import rng
from .config import ConfigError, RunConfig
from .data import DATASETS, Batcher, ImageDataset, evaluation_images, load
from .devices import resolve_device
from .evaluation import evaluate_bounds
from .fastpaths import compile_objective, retain_freed_memory, with_precision
from .files import OutputError, append_line, fault_point
from .models import LatentVariableModel, build_model
from .models.base import LogWeightTerms
from .objectives import ObjectiveResult, make_objective
from .optimizers import make_optimizer
from .preflight import check_memory, check_parameter_memory, preflight
from .runs import (
    CHECKPOINT,
    METRICS,
    RunError,
    RunLock,
    check_model_state,
    create_run_dir,
    holds_run,
    keep_metrics_upto,
    lock_run,
    open_unfinished_run,
    read_metrics,
    run_info,
    save_checkpoint,
    save_weights,
    write_info,
)
from .schedules import kl_weight, learning_rate
from .sinks import MetricSink, open_sinks

log = logging.getLogger("elbolab")


class NonFiniteError(FloatingPointError):
    """A loss or gradient became inf/NaN; the message names the step, batch and terms."""


def _field(state: dict[str, Any], key: str, kind: type | tuple[type, ...], source: Path | str,
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


class EpochMonitor(Protocol):
    """Measures the model every ``every`` epochs; its numbers join that epoch's metrics row.

    The trainer knows nothing of what is measured: the entry points (CLI, elbolab.train,
    reproduce) pass diagnostics.monitor.CollapseMonitor, which lives above this layer. A
    monitor must leave the model's weights, mode and gradients, and every RNG the run
    draws from, as it found them, so a monitored run trains exactly as an unmonitored one.
    """

    every: int

    def __call__(self, model: LatentVariableModel) -> dict[str, Any]: ...


def epoch_line(row: dict[str, Any], epochs: int, k: int) -> str:
    """The line printed after each epoch: bounds in nats, time, and the monitor's numbers."""
    parts = [f"epoch {row['epoch']}/{epochs}: train bound {row['train_bound']:.2f}"]
    if f"valid_iwae_{k}" in row:
        parts.append(f"valid L_{k} {row[f'valid_iwae_{k}']:.2f}" if k > 1 else f"valid ELBO {row['valid_elbo']:.2f}")
    parts.append(f"{row['seconds']:.1f} s")
    if "active_units" in row:
        parts.append(f"active units {row['active_units']}")
    if row.get("mutual_information") is not None:
        parts.append(f"I(x;z) {row['mutual_information']:.2f} nats")
    return ", ".join(parts)


def _term_labels(terms: LogWeightTerms) -> dict[str, Tensor]:
    """Every log-weight term by what it is: reconstruction, prior/KL or posterior, per layer."""
    out = {"reconstruction log p(x|z)": terms.log_likelihood}
    out.update({f"prior log p({n}) (KL, layer {n})": t for n, t in terms.log_prior.items()})
    out.update({f"posterior log q({n}|.) (KL, layer {n})": t for n, t in terms.log_posterior.items()})
    return out


def describe_fault(loss: Tensor, terms: LogWeightTerms, model: torch.nn.Module, where: str,
                   image_ids: Tensor) -> str:
    """One line: where it happened, which terms (how many images) and which layers' gradients."""
    parts = []
    if not torch.isfinite(loss):
        parts.append(f"loss={float(loss.detach())}")
    bad_images: set[int] = set()
    for name, t in _term_labels(terms).items():
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            cols = bad.reshape(-1, bad.shape[-1]).any(0).nonzero().flatten().tolist()
            bad_images.update(cols)
            parts.append(f"{name} non-finite for {len(cols)} of {bad.shape[-1]} images")
    grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if grads:
        shown = ", ".join(grads[:4]) + (f" and {len(grads) - 4} more" if len(grads) > 4 else "")
        parts.append(f"gradient non-finite in {shown}")
    ids = image_ids.cpu()
    picked = [int(ids[i]) for i in sorted(bad_images)[:5]] if bad_images else [int(i) for i in ids[:5]]
    what = "; ".join(parts) or "the bound overflowed with finite terms"
    return f"non-finite value at {where} (training images {picked}{'...' if len(ids) > 5 else ''}): {what}"


def step_readout(bound: Tensor, loss: Tensor, grads: list[Tensor]) -> tuple[float, float]:
    """The batch's summed bound, and a number that is finite when the loss and every
    gradient are, read back in one host transfer (one sync per step on a GPU).

    The number is loss + the gradients' total norm (one multi-tensor kernel, not a
    reduction per parameter): non-finite when any element is, or, rarely, when the norm
    overflows, which the caller re-checks element by element.
    """
    probe = loss.detach().float()
    if grads:
        probe = probe + torch.nn.utils.get_total_norm(grads, foreach=True).float()
    bound_sum, probe_value = torch.stack([bound.detach().sum().float(), probe]).tolist()
    return bound_sum, probe_value


def all_finite(loss: Tensor, grads: list[Tensor]) -> bool:
    """Element by element: the check behind a non-finite probe (rarely, an overflowing norm)."""
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)


def take_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: Callable[..., ObjectiveResult],
              x: Tensor, beta: float = 1.0) -> tuple[ObjectiveResult, float, bool]:
    """One training step: objective, backward, one read-back, and the optimizer's step when
    the loss and every gradient are finite. Returns the result, the batch's summed bound and
    whether the step was taken (the trainer and the benchmark both step through here)."""
    res = objective(model, x, beta)
    optimizer.zero_grad(set_to_none=True)
    res.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bound_sum, probe_value = step_readout(res.bound, res.loss, grads)
    if math.isfinite(probe_value) or all_finite(res.loss, grads):
        optimizer.step()
        return res, bound_sum, True
    return res, bound_sum, False


class Trainer:
    #: put before each epoch line: a sweep names the run ("lr=0.001: epoch 3/10: ...")
    line_prefix = ""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, dataset: ImageDataset | None = None,
                 monitor: EpochMonitor | None = None) -> None:
        preflight(cfg)
        self.cfg = cfg
        #: measures the model every ``monitor.every`` epochs (train.monitor_every; see EpochMonitor)
        self.monitor = monitor
        self.run_dir = Path(run_dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.train.device)
        self.dataset = (
            dataset if dataset is not None else load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
        )
        if self.dataset.name != DATASETS.canonical(cfg.data.name):
            log.warning("data.name is %r but the data passed in is %r: run.json records it as passed-in data, "
                        "and evaluate/diagnose will ask for it again (elbolab.train sets data.name=user)",
                        cfg.data.name, self.dataset.name)
        torch.manual_seed(cfg.train.seed)
        d = cfg.data
        self.batcher = Batcher(self.dataset.split("train"), self.dataset.binary, d.binarization,
                               d.binarization_seed, self.device)
        self.valid = (
            evaluation_images(self.dataset, "valid", d.binarization, d.binarization_seed).to(self.device)
            if "valid" in self.dataset.splits else None
        )
        train_float = self.dataset.as_float("train", "none")
        check_parameter_memory(cfg, self.dataset.data_dim, self.device, train_float, cfg.data.name)
        try:
            model = build_model(cfg.model, self.dataset.data_dim, train_float, dataset=cfg.data.name,
                                image_shape=self.dataset.image_shape)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model: cannot build {cfg.model.name!r} with this config: {e}") from None
        self.model: LatentVariableModel = model.to(self.device)
        # refused before anything is written: no run folder is left "running" by a step that cannot fit
        check_memory(cfg, self.model, self.dataset.data_dim, 0 if self.valid is None else self.valid.shape[0])
        self.optimizer = make_optimizer(self.model, cfg.train, self.device)
        self.objective = with_precision(make_objective(cfg.objective), self.model, cfg.train.precision, self.device)
        if cfg.train.compile:
            self.objective = compile_objective(self.objective, self.device)
        #: batch sizes the compiled objective has already been compiled for
        self._compiled_batches: set[int] = set()
        self.shuffle = torch.Generator().manual_seed(cfg.train.seed + 7)
        #: completed epochs, and steps taken (skipped ones included)
        self.epoch = 0
        self.step = 0
        self.best_valid = -math.inf
        self.epochs_since_best = 0
        self.nonfinite_skips = 0
        self.finished = False
        #: position inside the current epoch: its permutation (None until drawn), the
        #: next batch, and the running sums behind the epoch's train_bound
        self.order: Tensor | None = None
        self.next_batch = 0
        self.epoch_bound_sum = 0.0
        self.epoch_count = 0
        self._last_checkpoint = time.monotonic()
        self._interrupt: str | None = None
        #: the run folder's lock, held from prepare_run_dir to the end of fit
        self._lock: RunLock | None = None

    # --- persistence -----------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_valid": self.best_valid,
            "epochs_since_best": self.epochs_since_best,
            "nonfinite_skips": self.nonfinite_skips,
            "finished": self.finished,
            "position": {
                "order": self.order,
                "next_batch": self.next_batch,
                "bound_sum": self.epoch_bound_sum,
                "count": self.epoch_count,
            },
            "rng": rng.capture(self.batcher.generator, self.shuffle, self.device),
        }

    def load_state(self, state: dict[str, Any], source: Path | str = "checkpoint") -> None:
        """Take up a checkpoint's state; every field is checked first, so a damaged or crafted
        checkpoint is refused in one line naming the field, the run folder untouched."""
        model_state = _field(state, "model", dict, source)
        check_model_state(self.model, model_state, source)
        optimizer_state = _field(state, "optimizer", dict, source)
        epoch = _field(state, "epoch", int, source)
        step = _field(state, "step", int, source)
        best_valid = float(_field(state, "best_valid", (float, int), source))
        epochs_since_best = _field(state, "epochs_since_best", int, source)
        nonfinite_skips = _field(state, "nonfinite_skips", int, source, 0)
        finished = _field(state, "finished", bool, source)
        pos = _field(state, "position", (dict, type(None)), source, None) or {}
        order = _field(pos, "order", (torch.Tensor, type(None)), source, None)
        next_batch = _field(pos, "next_batch", int, source, 0)
        bound_sum = float(_field(pos, "bound_sum", (float, int), source, 0.0))
        count = _field(pos, "count", int, source, 0)
        rng_state = _field(state, "rng", dict, source)
        n = len(self.batcher)
        if order is not None:
            if order.numel() != n:
                raise RunError(f"{source}: its epoch permutation covers {order.numel()} images, "
                               f"the training split has {n}")
            if order.dtype != torch.int64 or order.dim() != 1 or not torch.equal(order.sort().values, torch.arange(n)):
                raise RunError(f"{source}: checkpoint field 'position.order' is not a permutation of the "
                               f"{n} training images")
        if next_batch > -(-n // self.cfg.train.batch_size):
            raise RunError(f"{source}: checkpoint field 'position.next_batch' is {next_batch}, past the epoch's end")
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            why = " ".join(str(e).split())[:300]
            raise RunError(f"{source}: does not fit the configured model/optimizer ({why})") from None
        try:
            rng.restore(rng_state, self.batcher.generator, self.shuffle, self.device)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            why = " ".join(str(e).split())[:200]
            raise RunError(f"{source}: checkpoint field 'rng' is damaged ({type(e).__name__}: {why})") from None
        self.epoch, self.step, self.best_valid = epoch, step, best_valid
        self.epochs_since_best, self.nonfinite_skips, self.finished = epochs_since_best, nonfinite_skips, finished
        self.order, self.next_batch, self.epoch_bound_sum, self.epoch_count = order, next_batch, bound_sum, count

    def save_checkpoint(self) -> None:
        save_checkpoint(self.state(), self.run_dir)
        self._last_checkpoint = time.monotonic()

    def prepare_run_dir(self, resume: bool | None = None) -> bool:
        """Create the run folder, or take up the unfinished run it holds.

        ``resume``: True (the folder must hold a run to continue), False (it must not),
        None (continue an unfinished run of the same config, else start one). A folder
        holding anything else is refused and left untouched. Returns True when resuming.
        """
        if not holds_run(self.run_dir):
            if resume:
                raise RunError(f"{self.run_dir}: no run to resume here (run.json missing)")
            info = run_info("running", self.cfg, self.dataset, self.epoch, self.step)
            self._lock = create_run_dir(self.run_dir, self.cfg, info)
            if self._lock is not None:
                return False
            # another process created this run a moment ago: handled as an existing run below
        if resume is False:
            raise RunError(f"{self.run_dir}: already holds a run; resume it or choose another --out")
        self._lock = lock_run(self.run_dir)
        try:
            state = open_unfinished_run(self.run_dir, self.cfg, self.dataset)
            if state is not None:
                self.load_state(state, self.run_dir / CHECKPOINT)
            # else: killed before the first checkpoint; the freshly seeded state is where it began
            keep_metrics_upto(self.run_dir, self.epoch)
            log.info("continuing the unfinished run in %s at epoch %d, batch %d (step %d)",
                     self.run_dir, self.epoch + 1, self.next_batch, self.step)
            self._write_info("running")
        except BaseException:
            self.release()
            raise
        return True

    def release(self) -> None:
        """Let go of the run folder (its lock); the OS does it too when the process ends."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _write_info(self, status: str, error: str | None = None) -> None:
        write_info(self.run_dir, status, self.cfg, self.dataset, self.epoch, self.step, error)

    # --- one step --------------------------------------------------------------
    def _step(self, x: Tensor, beta: float, where: str, image_ids: Tensor) -> float | None:
        """One optimizer step; returns the batch's summed bound, or None when the step was skipped.

        Loss and gradients are checked on the device and read back together with the
        bound in a single transfer, so the check costs no extra host sync.
        """
        res, bound_sum, taken = take_step(self.model, self.optimizer, self.objective, x, beta)
        self.step += 1
        if taken:
            return bound_sum
        self.handle_fault(res, where, image_ids)
        return None

    def handle_fault(self, res: ObjectiveResult, where: str, image_ids: Tensor) -> None:
        """A step with a non-finite loss or gradient was not taken: count it as skipped under
        ``train.nonfinite``, or raise :class:`NonFiniteError` naming what went wrong."""
        msg = describe_fault(res.loss, res.terms, self.model, f"step {self.step} ({where})", image_ids)
        self.optimizer.zero_grad(set_to_none=True)
        t = self.cfg.train
        if t.nonfinite == "skip" and self.nonfinite_skips < t.max_nonfinite_skips:
            self.nonfinite_skips += 1
            log.warning("%s; step skipped (%d of %d allowed)", msg, self.nonfinite_skips, t.max_nonfinite_skips)
            return
        policy = ("train.nonfinite=stop" if t.nonfinite == "stop"
                  else f"{t.max_nonfinite_skips} skipped steps already (train.max_nonfinite_skips)")
        raise NonFiniteError(f"{msg}; stopped ({policy}); the last good checkpoint is kept")

    # --- the loop --------------------------------------------------------------
    def begin_epoch(self) -> tuple[tuple[Tensor, ...], float]:
        """The current epoch's batches of image indices (its permutation drawn when it starts)
        and its learning rate, set on the optimizer."""
        if self.order is None:
            self.order = torch.randperm(len(self.batcher), generator=self.shuffle)
            self.next_batch, self.epoch_bound_sum, self.epoch_count = 0, 0.0, 0
        # one host-to-device copy of the permutation per epoch, none per step
        batches = self.order.to(self.device).split(self.cfg.train.batch_size)
        lr = learning_rate(self.cfg.train, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        return batches, lr

    def epoch_summary(self, n_batches: int, lr: float) -> dict[str, float]:
        """The epoch's metrics row so far: mean training bound, learning rate, last KL weight."""
        mean = self.epoch_bound_sum / self.epoch_count if self.epoch_count else math.nan
        beta = kl_weight(self.epoch + (n_batches - 1) / n_batches, self.cfg.objective.warmup_epochs)
        return {"train_bound": mean, "lr": lr, "kl_weight": beta}

    def train_epoch(self) -> dict[str, float]:
        """Run the rest of the current epoch (all of it, unless resumed mid-epoch)."""
        cfg = self.cfg
        batches, lr = self.begin_epoch()
        # None: shown on a terminal only (a log file gets the epoch lines)
        bar = tqdm(range(self.next_batch, len(batches)), desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                   leave=False, disable=None if cfg.train.progress else True, unit="batch")
        for i in bar:
            idx = batches[i]
            x = self.batcher.batch(idx)
            beta = kl_weight(self.epoch + i / len(batches), cfg.objective.warmup_epochs)
            compiling = cfg.train.compile and x.shape[0] not in self._compiled_batches
            if compiling:
                log.info("compiling the training step for batches of %d (torch.compile: once per batch size, "
                         "seconds on a GPU, tens of seconds on a CPU)", x.shape[0])
                t_compile = time.perf_counter()
            bound_sum = self._step(x, beta, f"epoch {self.epoch + 1}, batch {i}", idx)
            if compiling:
                self._compiled_batches.add(x.shape[0])
                log.info("compiled in %.1f s", time.perf_counter() - t_compile)
            if bound_sum is not None:
                self.epoch_bound_sum += bound_sum
                self.epoch_count += x.shape[0]
            self.next_batch = i + 1
            fault_point("step")
            if self._interrupt or (i + 1 < len(batches) and self._checkpoint_due()):
                self.save_checkpoint()
                self._raise_if_interrupted()
            if i % 10 == 0 and self.epoch_count:
                bar.set_postfix(bound=f"{self.epoch_bound_sum / self.epoch_count:.2f}")
        return self.epoch_summary(len(batches), lr)

    def _monitor_due(self) -> bool:
        """Every ``monitor.every`` epochs and at the last planned one (the epoch just trained)."""
        m = self.monitor
        done = self.epoch + 1
        return m is not None and m.every > 0 and (done % m.every == 0 or done == self.cfg.train.epochs)

    def _checkpoint_due(self) -> bool:
        t = self.cfg.train
        if t.checkpoint_steps and self.step % t.checkpoint_steps == 0:
            return True
        return bool(t.checkpoint_minutes) and time.monotonic() - self._last_checkpoint >= 60 * t.checkpoint_minutes

    def _raise_if_interrupted(self) -> None:
        if self._interrupt:
            log.warning("%s: checkpoint written at step %d; stopping", self._interrupt, self.step)
            raise KeyboardInterrupt(self._interrupt)

    def _graceful_signals(self) -> contextlib.AbstractContextManager[None]:
        return graceful_signals(self)

    def validate(self) -> dict[str, float]:
        if self.valid is None:
            return {}
        self.model.eval()
        k = self.cfg.objective.k
        b = evaluate_bounds(self.model, self.valid, k=k, batch_size=500, seed=self.cfg.eval.seed)
        return {"valid_elbo": b["elbo"], f"valid_iwae_{k}": b[f"iwae_{k}"]}

    def fit(self, resume: bool | None = None, keep_lock: bool = False) -> Path:
        """Train to the end; ``resume`` as in :meth:`prepare_run_dir` (None: automatic).
        The run folder stays locked until :meth:`release` with ``keep_lock`` (the CLI evaluates it first)."""
        self.prepare_run_dir(resume)
        ok = False
        try:
            path = self._fit()
            ok = True
            return path
        finally:
            if not (ok and keep_lock):
                self.release()

    def _fit(self) -> Path:
        cfg = self.cfg
        sinks = open_sinks(cfg, self.run_dir, self.epoch + 1)
        self._last_checkpoint = time.monotonic()
        try:
            with self._graceful_signals():
                while self.epoch < cfg.train.epochs and not self.finished:
                    t0 = time.perf_counter()
                    row: dict[str, Any] = {"epoch": self.epoch + 1}
                    row.update(self.train_epoch())
                    sinks = self.close_epoch(row, t0, sinks)
                    self._raise_if_interrupted()
                self.finish()
        except KeyboardInterrupt:
            self._write_info_quietly("interrupted")
            raise
        except (NonFiniteError, OutputError) as e:
            self._write_info_quietly("failed", str(e))
            raise
        except Exception as e:  # never leave a dead run marked "running"
            self._write_info_quietly("failed", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            raise
        finally:
            close_sinks(sinks)
        return self.run_dir

    def close_epoch(self, row: dict[str, Any], t0: float, sinks: list[MetricSink] | None = None
                    ) -> list[MetricSink]:
        """After an epoch's last step: validate, monitor, log the metrics row (to metrics.jsonl
        and ``sinks``), track the best weights and early stopping, checkpoint. ``row`` holds
        the epoch number and the training metrics; returns the sinks still working."""
        cfg = self.cfg
        if cfg.train.eval_every and (self.epoch + 1) % cfg.train.eval_every == 0:
            row.update(self.validate())
        row["seconds"] = round(time.perf_counter() - t0, 3)
        images: dict[str, Any] = {}
        if self._monitor_due():
            row.update(self.monitor(self.model))
            # the figures an image sink (TensorBoard) shows: diagnostics.monitor.CollapseMonitor.images
            if hasattr(self.monitor, "images") and any(hasattr(s, "log_images") for s in sinks or []):
                images = self.monitor.images(self.model, [*read_metrics(self.run_dir / METRICS), row])
        self.epoch += 1
        self.order, self.next_batch = None, 0
        self._track_best(row)
        append_line(self.run_dir / METRICS, json.dumps(row))
        sinks = _log_to_sinks(sinks or [], row, self.epoch, images)
        log.info("%s%s", self.line_prefix, epoch_line(row, cfg.train.epochs, cfg.objective.k))
        log.debug("epoch %d: %s", self.epoch, json.dumps(row))
        patience = cfg.train.early_stopping_patience
        if patience and self.epochs_since_best >= patience:
            log.info("early stopping: %d epochs without a better validation bound", patience)
            self.finished = True
        self.save_checkpoint()
        self._write_info("running")
        return sinks

    def finish(self) -> None:
        """The run is done: final (and, without validation, best) weights, last checkpoint, status."""
        self.finished = True
        save_weights(self.model, self.run_dir / "model.safetensors")
        if not (self.run_dir / "best.safetensors").exists():
            save_weights(self.model, self.run_dir / "best.safetensors")
        self.save_checkpoint()
        self._write_info("finished")

    def _write_info_quietly(self, status: str, error: str | None = None) -> None:
        """Record how the run ended, unless the disk refuses that too (the real error wins)."""
        with contextlib.suppress(OutputError):
            self._write_info(status, error)

    def _track_best(self, row: dict[str, Any]) -> None:
        """Keep the weights best on validation; count epochs without a better bound.

        As in the VampPrior code (utils/perform_experiment.py), the best weights are
        tracked from the first epoch, but the early-stopping count stays at zero while
        the KL weight is below 1 (epochs 1..warmup_epochs), so no run stops in warm-up.
        """
        key = f"valid_iwae_{self.cfg.objective.k}"
        if key not in row:
            return
        if row[key] > self.best_valid:
            self.best_valid = row[key]
            self.epochs_since_best = 0
            save_weights(self.model, self.run_dir / "best.safetensors")
        elif self.epoch <= self.cfg.objective.warmup_epochs:
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += 1



@contextlib.contextmanager
def graceful_signals(loop: Any) -> Iterator[None]:
    """Ctrl-C / SIGTERM set ``loop._interrupt``, asking it to checkpoint after the current step
    and stop; a second one stops at once. Signals reach the main thread only, so elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum: int, frame: object) -> None:
        if loop._interrupt:
            raise KeyboardInterrupt
        loop._interrupt = signal.Signals(signum).name

    old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def close_sinks(sinks: list[MetricSink]) -> None:
    """Close every sink; a failure is a warning (closing must not mask how the run ended)."""
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 - any failure of a third-party logger
            log.warning("%s: closing failed (%s: %s); metrics.jsonl holds every row", type(sink).__name__,
                        type(e).__name__, str(e)[:200])


def _log_to_sinks(sinks: list[MetricSink], row: dict[str, Any], step: int,
                  images: dict[str, Any] | None = None) -> list[MetricSink]:
    """Log ``row`` to every sink; one that fails is dropped with a warning (metrics.jsonl has
    the row, and a logging service must not cost the run)."""
    kept = []
    for sink in sinks:
        try:
            sink.log(row, step)
            if images and hasattr(sink, "log_images"):  # figures, at the monitor's epochs
                sink.log_images(images, step)
            kept.append(sink)
        except Exception as e:  # noqa: BLE001 - any failure of a third-party logger
            log.warning("%s failed (%s: %s); no longer logging to it, metrics.jsonl goes on",
                        type(sink).__name__, type(e).__name__, str(e)[:200])
    return kept


def train(cfg: RunConfig, run_dir: str | Path, resume: bool | None = None,
          dataset: ImageDataset | None = None, monitor: EpochMonitor | None = None) -> Path:
    """Train ``cfg`` into ``run_dir``; an unfinished run of the same config there is continued.

    An entry point, like the CLI: it also lets the process keep freed memory for the step's
    big temporaries (fastpaths.retain_freed_memory).
    """
    retain_freed_memory()
    return Trainer(cfg, run_dir, dataset, monitor).fit(resume=resume)
