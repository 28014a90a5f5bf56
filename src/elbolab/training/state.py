"""One run's state: built from its config, its counters, checkpoints, epoch close, best weights,
fault policy and run folder (created or taken up through runs.py).

No lost training: state is checkpointed atomically at every epoch end and, mid-epoch,
whenever the loop says so (``train.checkpoint_minutes`` / ``train.checkpoint_steps``, Ctrl-C,
SIGTERM). A checkpoint (runs.Checkpoint) holds tensors and plain containers only: model,
optimizer, the position in the epoch, early-stopping counters and every RNG the run draws
from, so a resumed run continues the very same stream of batches and samples; on CPU it ends
bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import rng
from ..config import ConfigError, RunConfig
from ..data import DATASETS, Batcher, ImageDataset, evaluation_images, load
from ..devices import resolve_device, use_threads
from ..evaluation import evaluate_bounds, seeded
from ..fastpaths import compile_objective, with_precision
from ..files import OutputError, append_line
from ..fused import FusedStep, fused_step_for
from ..models import LatentVariableModel, build_model
from ..objectives import ObjectiveResult, make_objective, objective_plan
from ..optimizers import make_optimizer
from ..preflight import check_memory, check_parameter_memory
from ..runs import (
    CHECKPOINT,
    METRICS,
    Checkpoint,
    RunError,
    RunLock,
    create_run_dir,
    describe_model,
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
from ..schedules import kl_weight, learning_rate
from ..sinks import MetricSink
from .step import NonFiniteError, StepOutcome, StepRun, describe_fault

log = logging.getLogger("elbolab")


class EpochMonitor(Protocol):
    """Measures the model every ``every`` epochs; its numbers join that epoch's metrics row.

    The trainer knows nothing of what is measured: the entry points (CLI, elbolab.train,
    reproduce) pass diagnostics.monitor.CollapseMonitor, which lives above this layer. A
    monitor must leave the model's weights, mode and gradients, and every RNG the run
    draws from, as it found them, so a monitored run trains exactly as an unmonitored one.
    """

    every: int

    def __call__(self, model: LatentVariableModel) -> dict[str, Any]: ...


#: builds a run's epoch monitor from its config and data (None: not monitored); the caller
#: supplies it, as the monitor lives above training (diagnostics.monitor.run_monitor)
MonitorFactory = Callable[[RunConfig, ImageDataset], EpochMonitor | None]


#: epochs the remaining-time estimate averages over: recent ones, so it follows a machine's load
ETA_EPOCHS = 5


def time_left(seconds: float) -> str:
    """An estimate of the time left, as an epoch line ends: "~40 s", "~7 min", "~2 h 05 min"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"~{s} s"
    minutes = round(s / 60)
    if minutes < 60:
        return f"~{minutes} min"
    h, m = divmod(minutes, 60)
    return f"~{h} h {m:02d} min"


def epoch_line(row: dict[str, Any], epochs: int, k: int, left: float | None = None) -> str:
    """The line printed after each epoch: bounds in nats, time, the monitor's numbers and, before
    the last epoch, ``left``: the estimated seconds to the run's end (:meth:`RunState.seconds_left`)."""
    parts = [f"epoch {row['epoch']}/{epochs}: train bound {row['train_bound']:.2f}"]
    if f"valid_iwae_{k}" in row:
        parts.append(f"valid L_{k} {row[f'valid_iwae_{k}']:.2f}" if k > 1 else f"valid ELBO {row['valid_elbo']:.2f}")
    parts.append(f"{row['seconds']:.1f} s")
    if "active_units" in row:
        parts.append(f"active units {row['active_units']}")
    if row.get("mutual_information") is not None:
        parts.append(f"I(x;z) {row['mutual_information']:.2f} nats")
    if left is not None and row["epoch"] < epochs:
        parts.append(f"{time_left(left)} left")
    return ", ".join(parts)


def global_rng(device: torch.device, state: Tensor | None = None) -> Tensor:
    """Torch's global stream for ``device``: read it, or set it to ``state`` first."""
    if device.type == "cuda":
        if state is not None:
            torch.cuda.set_rng_state(state, device)
        return torch.cuda.get_rng_state(device)
    if state is not None:
        torch.set_rng_state(state)
    return torch.get_rng_state()


class RunState:
    """One run: its model, optimizer, objective, data order and counters, and its run folder.

    Built from the config (refusing, before anything is written, a model that cannot be built
    or a step that cannot fit in memory); the loop (loop.Loop) steps it. ``images`` shares the
    training and validation images between runs of one binarization (a stack's runs).
    """

    #: put before each epoch line: a sweep names the run ("lr=0.001: epoch 3/10: ...")
    line_prefix = ""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, dataset: ImageDataset | None = None,
                 monitor: EpochMonitor | None = None,
                 images: dict[tuple[str, int], tuple[Tensor, Tensor | None]] | None = None, *,
                 model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``model``: a model elbolab did not build (elbolab.train_model), trained in place instead of
        building the config's (whose ``model`` section then goes unused); run.json records its class
        and tensors (runs.describe_model), and a resume or reload must bring one of the same kind.
        ``optimizer``: its optimizer (default: train.optimizer's, over its parameters)."""
        self.cfg = cfg
        #: what run.json records of a model elbolab did not build (None: the config's own)
        self.wrapped = describe_model(model) if model is not None else None
        #: measures the model every ``monitor.every`` epochs (train.monitor_every; see EpochMonitor)
        self.monitor = monitor
        self.run_dir = Path(run_dir)
        use_threads(cfg.train.threads)
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
        shared_key = (self.batcher.binarization, d.binarization_seed)
        if images is not None and shared_key in images:  # one copy per binarization, not per run
            self.batcher.data, self.valid = images[shared_key]
        else:
            self.valid = (
                evaluation_images(self.dataset, "valid", d.binarization, d.binarization_seed).to(self.device)
                if "valid" in self.dataset.splits else None
            )
            if images is not None:
                images[shared_key] = (self.batcher.data, self.valid)
        if model is None:
            train_float = self.dataset.as_float("train", "none")
            check_parameter_memory(cfg, self.dataset.data_dim, self.device, train_float, cfg.data.name)
            try:
                model = build_model(cfg.model, self.dataset.data_dim, train_float, dataset=cfg.data.name,
                                    image_shape=self.dataset.image_shape)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"model: cannot build {cfg.model.name!r} with this config: {e}") from None
            model = model.to(self.device)
            # refused before anything is written: no run folder is left "running" by a step that cannot fit
            check_memory(cfg, model, self.dataset.data_dim, 0 if self.valid is None else self.valid.shape[0])
        self.model: LatentVariableModel = model
        #: a model trained against an adversary (models.avb) steps it with an optimizer of its own
        self.adversary_optimizer: torch.optim.Optimizer | None = None
        if hasattr(self.model, "adversary_parameters"):
            self._check_adversarial(cfg, cfg.model.name if self.wrapped is None else type(model).__name__)
            self.optimizer = optimizer or make_optimizer(self.model, cfg.train, self.device,
                                                         self.model.vae_parameters())
            self.adversary_optimizer = make_optimizer(self.model, cfg.train, self.device,
                                                      self.model.adversary_parameters())
        else:
            self.optimizer = optimizer or make_optimizer(self.model, cfg.train, self.device)
        self.objective = with_precision(make_objective(cfg.objective), self.model, cfg.train.precision, self.device)
        if cfg.train.compile:
            self.objective = compile_objective(self.objective, self.device)
        #: batch sizes the compiled objective has already been compiled for
        self.compiled_batches: set[int] = set()
        self.shuffle = torch.Generator().manual_seed(cfg.train.seed + 7)
        #: torch's global stream as the run's seed left it (where a fresh run draws from)
        self.seeded_rng = global_rng(self.device).clone()
        #: the run's own sample stream while it trains in a stack (None: torch's global one)
        self.generator: torch.Generator | None = None
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
        self.last_checkpoint = time.monotonic()
        #: seconds of each epoch trained (its step and monitor time), read back from
        #: metrics.jsonl at the first epoch end, so a resumed run's estimate counts the earlier ones
        self.epoch_seconds: list[float] | None = None
        #: the run folder's lock, held from prepare_run_dir to release
        self._lock: RunLock | None = None
        self._fused: FusedStep | None = None
        if cfg.train.fused == "on":  # refused before anything is written, naming what does not fit
            self._fused = fused_step_for(self.model, self.optimizer, cfg)

    @staticmethod
    def _check_adversarial(cfg: RunConfig, name: str) -> None:
        """A model with an adversary trains the single-sample ELBO with its estimated KL: other
        objectives read log q(z|x) (importance weights, STL/DReG), which it does not have."""
        o = cfg.objective
        if o.name != "vae" or o.k != 1 or o.estimator != "standard":
            raise ConfigError(f"objective: model {name!r}, trained against an adversary, trains "
                              "objective.name=vae, k=1, estimator=standard only (its q(z|x) is implicit: no importance "
                              "weights, no log q to detach); "
                              f"got {o.name}, k={o.k}, {o.estimator}")
        if cfg.train.fused == "on" or cfg.train.compile:
            raise ConfigError(f"train: model {name!r} takes its own paired step: train.fused and "
                              "train.compile do not apply")

    # --- the step's view of the run ----------------------------------------------------------
    def step_run(self) -> StepRun:
        """What a step needs of this run (step.make_step), its fused step (train.fused) included."""
        plan, estimator = objective_plan(self.cfg.objective)
        fused = self.fused_step() if self.adversary_optimizer is None else None
        return StepRun(self.model, self.optimizer, self.objective, plan, estimator, self.generator,
                       self.cfg.train.precision, self.device, fused, self.adversary_optimizer)

    def fused_step(self) -> FusedStep | None:
        """The run's fused step under train.fused (built once; again if the model's parameters were
        replaced), or None for the plain step."""
        params = list(self.model.parameters())
        if self._fused is None or len(self._fused.params) != len(params) or any(
                a is not b for a, b in zip(self._fused.params, params, strict=True)):
            self._fused = fused_step_for(self.model, self.optimizer, self.cfg)
        return self._fused

    def own_stream(self) -> None:
        """Draw samples from a generator of the run's own, holding torch's global stream as it is
        now (a stack's runs each keep theirs; a run alone draws from the global one)."""
        g = torch.Generator(device=self.device)
        g.set_state(global_rng(self.device))
        self.generator = g

    # --- persistence -----------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint's contents (runs.Checkpoint); the run's stream recorded where a run alone keeps it."""
        if self.generator is not None:
            global_rng(self.device, self.generator.get_state())
        return Checkpoint(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), epoch=self.epoch, step=self.step,
            best_valid=self.best_valid, epochs_since_best=self.epochs_since_best,
            nonfinite_skips=self.nonfinite_skips, finished=self.finished, order=self.order,
            next_batch=self.next_batch, bound_sum=self.epoch_bound_sum, count=self.epoch_count,
            rng=rng.capture(self.batcher.generator, self.shuffle, self.device),
            adversary_optimizer=None if self.adversary_optimizer is None else self.adversary_optimizer.state_dict(),
        ).to_state()

    def load_state(self, state: dict[str, Any], source: Path | str = "checkpoint") -> None:
        """Take up a checkpoint's state; every field is checked first (runs.Checkpoint), so a damaged
        or crafted checkpoint is refused in one line naming the field, the run folder untouched."""
        ck = Checkpoint.from_state(state, source, self.model, len(self.batcher), self.cfg.train.batch_size)
        try:
            self.model.load_state_dict(ck.model)
            self.optimizer.load_state_dict(ck.optimizer)
            if (ck.adversary_optimizer is None) != (self.adversary_optimizer is None):
                raise ValueError("the adversary's optimizer state is "
                                 + ("missing" if ck.adversary_optimizer is None else "there, for a model without one"))
            if self.adversary_optimizer is not None:
                self.adversary_optimizer.load_state_dict(ck.adversary_optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            why = " ".join(str(e).split())[:300]
            raise RunError(f"{source}: does not fit the configured model/optimizer ({why})") from None
        try:
            rng.restore(ck.rng, self.batcher.generator, self.shuffle, self.device)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            why = " ".join(str(e).split())[:200]
            raise RunError(f"{source}: checkpoint field 'rng' is damaged ({type(e).__name__}: {why})") from None
        self.epoch, self.step, self.best_valid = ck.epoch, ck.step, ck.best_valid
        self.epochs_since_best, self.nonfinite_skips, self.finished = ck.epochs_since_best, ck.nonfinite_skips, \
            ck.finished
        self.order, self.next_batch, self.epoch_bound_sum, self.epoch_count = ck.order, ck.next_batch, \
            ck.bound_sum, ck.count
        if self.generator is not None:
            self.generator.set_state(global_rng(self.device))

    def save_checkpoint(self) -> None:
        save_checkpoint(self.state(), self.run_dir)
        self.last_checkpoint = time.monotonic()

    def checkpoint_due(self) -> bool:
        """Whether ``train.checkpoint_steps`` or ``train.checkpoint_minutes`` asks for a checkpoint now."""
        t = self.cfg.train
        if t.checkpoint_steps and self.step % t.checkpoint_steps == 0:
            return True
        return bool(t.checkpoint_minutes) and time.monotonic() - self.last_checkpoint >= 60 * t.checkpoint_minutes

    def prepare_run_dir(self, resume: bool | None = None) -> bool:
        """Create the run folder, or take up the unfinished run it holds.

        ``resume``: True (the folder must hold a run to continue), False (it must not),
        None (continue an unfinished run of the same config, else start one). A folder
        holding anything else is refused and left untouched. Returns True when resuming.
        """
        global_rng(self.device, self.seeded_rng)  # where this run's stream starts, whatever ran since
        if not holds_run(self.run_dir):
            if resume:
                raise RunError(f"{self.run_dir}: no run to resume here (run.json missing)")
            info = run_info("running", self.cfg, self.dataset, self.epoch, self.step, wrapped=self.wrapped)
            self._lock = create_run_dir(self.run_dir, self.cfg, info)
            if self._lock is not None:
                return False
            # another process created this run a moment ago: handled as an existing run below
        if resume is False:
            raise RunError(f"{self.run_dir}: already holds a run; resume it or choose another --out")
        self._lock = lock_run(self.run_dir)
        try:
            state = open_unfinished_run(self.run_dir, self.cfg, self.dataset, self.wrapped)
            if state is not None:
                self.load_state(state, self.run_dir / CHECKPOINT)
            # else: killed before the first checkpoint; the freshly seeded state is where it began
            keep_metrics_upto(self.run_dir, self.epoch)
            log.info("continuing the unfinished run in %s at epoch %d, batch %d (step %d)",
                     self.run_dir, self.epoch + 1, self.next_batch, self.step)
            self.write_info("running")
        except BaseException:
            self.release()
            raise
        return True

    def release(self) -> None:
        """Let go of the run folder (its lock); the OS does it too when the process ends."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write_info(self, status: str, error: str | None = None) -> None:
        write_info(self.run_dir, status, self.cfg, self.dataset, self.epoch, self.step, error, self.wrapped)

    def write_info_quietly(self, status: str, error: str | None = None) -> None:
        """Record how the run ended, unless the disk refuses that too (the real error wins)."""
        with contextlib.suppress(OutputError):
            self.write_info(status, error)

    # --- one step --------------------------------------------------------------
    def record_step(self, outcome: StepOutcome, batch: int, image_ids: Tensor) -> None:
        """Count a step the loop took on ``batch`` of the current epoch: its bound joins the
        epoch's sums, or, not taken, the run's fault policy handles it (:meth:`handle_fault`)."""
        self.step += 1
        self.next_batch = batch + 1
        if outcome.taken:
            self.epoch_bound_sum += outcome.bound_sum
            self.epoch_count += int(image_ids.shape[0])
        else:
            self.handle_fault(outcome.result, f"epoch {self.epoch + 1}, batch {batch}", image_ids)

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

    # --- epochs ----------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Trained to its last epoch, or stopped early."""
        return self.finished or self.epoch >= self.cfg.train.epochs

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
        if self.adversary_optimizer is not None:
            for group in self.adversary_optimizer.param_groups:
                group["lr"] = lr * self.model.adversary_lr_ratio
        self.model.train()
        return batches, lr

    def kl_weight(self, batch: int, n_batches: int) -> float:
        """The KL weight of ``batch`` of the current epoch (objective.warmup_epochs)."""
        return kl_weight(self.epoch + batch / n_batches, self.cfg.objective.warmup_epochs)

    def epoch_summary(self, n_batches: int, lr: float) -> dict[str, float]:
        """The epoch's metrics row so far: mean training bound, learning rate, last KL weight."""
        mean = self.epoch_bound_sum / self.epoch_count if self.epoch_count else math.nan
        return {"train_bound": mean, "lr": lr, "kl_weight": self.kl_weight(n_batches - 1, n_batches)}

    def _monitor_due(self) -> bool:
        """Every ``monitor.every`` epochs and at the last planned one (the epoch just trained)."""
        m = self.monitor
        done = self.epoch + 1
        return m is not None and m.every > 0 and (done % m.every == 0 or done == self.cfg.train.epochs)

    def validate(self) -> dict[str, float]:
        if self.valid is None:
            return {}
        self.model.eval()
        k = self.cfg.objective.k
        if hasattr(self.model, "estimated_elbo"):  # no importance weights: the adversary's ELBO estimate
            with torch.no_grad(), seeded(self.cfg.eval.seed, self.device):  # the training stream untouched
                elbo = float(torch.cat([self.model.estimated_elbo(v) for v in self.valid.split(500)]).mean())
            return {"valid_elbo": elbo, f"valid_iwae_{k}": elbo}
        b = evaluate_bounds(self.model, self.valid, k=k, batch_size=500, seed=self.cfg.eval.seed)
        return {"valid_elbo": b["elbo"], f"valid_iwae_{k}": b[f"iwae_{k}"]}

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
        left = self.seconds_left(row)
        append_line(self.run_dir / METRICS, json.dumps(row))
        sinks = log_to_sinks(sinks or [], row, self.epoch, images)
        log.info("%s%s", self.line_prefix, epoch_line(row, cfg.train.epochs, cfg.objective.k, left))
        log.debug("epoch %d: %s", self.epoch, json.dumps(row))
        patience = cfg.train.early_stopping_patience
        if patience and self.epochs_since_best >= patience:
            log.info("early stopping: %d epochs without a better validation bound", patience)
            self.finished = True
        self.save_checkpoint()
        self.write_info("running")
        return sinks

    def seconds_left(self, row: dict[str, Any]) -> float:
        """Estimated seconds to the run's last epoch, after the epoch of ``row`` (its metrics row):
        the mean time of the last :data:`ETA_EPOCHS` epochs, resumed ones included, times the epochs left."""
        if self.epoch_seconds is None:
            self.epoch_seconds = [_epoch_cost(r) for r in read_metrics(self.run_dir / METRICS)
                                  if r["epoch"] < row["epoch"]]
        self.epoch_seconds.append(_epoch_cost(row))
        recent = self.epoch_seconds[-ETA_EPOCHS:]
        return sum(recent) / len(recent) * max(0, self.cfg.train.epochs - row["epoch"])

    def finish(self) -> None:
        """The run is done: final (and, without validation, best) weights, last checkpoint, status."""
        self.finished = True
        save_weights(self.model, self.run_dir / "model.safetensors")
        if not (self.run_dir / "best.safetensors").exists():
            save_weights(self.model, self.run_dir / "best.safetensors")
        self.save_checkpoint()
        self.write_info("finished")

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


def _epoch_cost(row: dict[str, Any]) -> float:
    """An epoch's seconds in its metrics row: training and validation, and the monitor's."""
    cost = 0.0
    for key in ("seconds", "monitor_seconds"):
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            cost += float(value)
    return cost


def close_sinks(sinks: list[MetricSink]) -> None:
    """Close every sink; a failure is a warning (closing must not mask how the run ended)."""
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 - any failure of a third-party logger
            log.warning("%s: closing failed (%s: %s); metrics.jsonl holds every row", type(sink).__name__,
                        type(e).__name__, str(e)[:200])


def log_to_sinks(sinks: list[MetricSink], row: dict[str, Any], step: int,
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
